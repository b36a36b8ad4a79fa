"""Medical image I/O: readers, writers and the cohort format (SPEC 2.1)."""

from .cohort import Case, Cohort, CohortError, create_cohort, open_cohort, write_case

__all__ = ["Case", "Cohort", "CohortError", "create_cohort", "open_cohort", "write_case"]
