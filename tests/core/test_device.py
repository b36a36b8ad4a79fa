"""Device and precision choices, the fp32 positional encoding and the bf16-autocast decode,
checked on the CPU (CPU autocast runs the same dtype rules as CUDA autocast)."""

from __future__ import annotations

import pytest
import torch

from segmote_core.device import (DEVICE_CHOICES, best_device, bf16_native, cpu_bf16_native,
                                 resolve_device)
from segmote_core.modeling import ImageFeatures
from segmote_core.predictor import use_bf16


def test_best_device_on_this_machine():
    want = "cuda" if torch.cuda.is_available() else (
        "mps" if torch.backends.mps.is_available() else "cpu")
    assert best_device().type == want
    assert resolve_device("auto") == best_device() and resolve_device(None) == best_device()
    assert resolve_device("cpu").type == "cpu"
    assert DEVICE_CHOICES == ("auto", "cuda", "mps", "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_asking_for_cuda_without_it_says_so():
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device("cuda")
    assert bf16_native("cuda") is False
    with pytest.raises(ValueError, match="choose one of"):
        resolve_device("xla")


def test_bf16_auto_follows_the_hardware(tiny_model_256):
    """``auto`` asks the device helper; the small encoders never take bf16 on the CPU; an
    explicit choice wins."""
    cap = torch.backends.cpu.get_cpu_capability()
    assert cpu_bf16_native() == ("AMX" in cap or _cpu_flag("avx512_bf16") or _cpu_flag("amx_bf16"))
    assert bf16_native("cpu") == cpu_bf16_native()
    assert use_bf16(tiny_model_256, "auto") is False
    assert use_bf16(tiny_model_256, "bf16") is True and use_bf16(tiny_model_256, "fp32") is False


def _cpu_flag(name: str) -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return name in f.read()
    except OSError:
        return False


def test_dense_pe_is_fp32_under_autocast_and_cached_so(tiny_model_256):
    """Before: under autocast the PE was computed in bf16 and cached, and a later fp32 decode
    reused the bf16 copy (max error ~0.1)."""
    model = tiny_model_256.eval()
    with torch.no_grad():
        ref = model.sam.prompt_encoder.get_dense_pe()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            pe_auto = model.dense_pe()
        pe_later = model.dense_pe()
    assert pe_auto.dtype == torch.float32 and pe_later.dtype == torch.float32
    assert float((pe_auto - ref).abs().max()) < 1e-6
    assert float((pe_later - ref).abs().max()) < 1e-6
    # with gradients (training) too
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pe_train = model.dense_pe()
    assert pe_train.dtype == torch.float32
    assert float((pe_train.detach() - ref).abs().max()) < 1e-6


def test_eval_decode_under_bf16_autocast(tiny_model_256):
    """Before: the router ran in bf16 under autocast; on CUDA (whose autocast runs softmax in
    fp32) its scatter then failed in eval (bf16 logits, fp32 gates). Now it routes in fp32."""
    model = tiny_model_256.eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("w_gate"):
                p.normal_(0.0, 0.1)
    s = model.config.embedding_size
    feats = ImageFeatures(torch.randn(2, model.config.preset.prompt_dim, s, s), None)
    if model.needs_interm:
        feats = ImageFeatures(feats.image_embeddings,
                              torch.randn(2, s, s, model.sam.image_encoder.patch_embed.proj
                                          .out_channels))
    boxes = torch.tensor([[10.0, 10, 120, 120], [30.0, 40, 200, 180]])
    with torch.no_grad():
        ref = model.decode(feats, boxes=boxes)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model.decode(feats, boxes=boxes)
    assert out.selected_expert is not None
    for routing in out.routings:  # the router decides in fp32 whatever autocast says
        assert routing.logits.dtype == torch.float32 and routing.gates.dtype == torch.float32
    assert torch.equal(out.selected_expert, ref.selected_expert)
    agree = ((out.low_res_masks[:, 0] > 0) == (ref.low_res_masks[:, 0] > 0)).float().mean()
    assert float(agree) > 0.97


# ----------------------------------------------------------------------------- preprocessing
def _images():
    import numpy as np

    rng = np.random.default_rng(0)
    nan = rng.normal(size=(30, 30)).astype(np.float32)
    nan[rng.random((30, 30)) > 0.9] = np.nan
    return [(rng.normal(0, 300, (97, 131)).astype(np.int16), "auto"),
            (rng.integers(0, 4000, (64, 80)).astype(np.uint16), "CT"),
            (rng.integers(0, 4000, (64, 80)).astype(np.uint16), "MR"),
            (rng.normal(size=(50, 60)), "auto"),
            (rng.integers(0, 256, (40, 30, 3)).astype(np.uint8), "auto"),
            (nan, "MR"), (rng.random((20, 20)) > 0.5, "auto")]


def test_normalisation_on_the_device_equals_the_numpy_one():
    from segmote_core.transforms import normalize_intensity, normalize_to_tensor, to_tensor_image

    for image, modality in _images():
        want = to_tensor_image(normalize_intensity(image, modality))
        got = normalize_to_tensor(image, modality, device=best_device())
        assert got.shape == want.shape and got.dtype == torch.float32
        assert float((got.cpu() - want).abs().max()) < 1e-3, (image.dtype, modality)
    import numpy as np

    with pytest.raises(ValueError, match="no finite values"):
        normalize_to_tensor(np.full((4, 4), np.nan), "MR")


def test_batch_and_predictor_inputs_equal_the_cpu_numpy_path(tiny_model_256):
    """The encoder input made on the model's device equals the old path (numpy
    normalisation, CPU resize, then copy) within float rounding."""
    import numpy as np

    from segmote_core.inference import prepare_batch
    from segmote_core.predictor import SegMoTEPredictor
    from segmote_core.transforms import ResizePad, normalize_intensity, to_tensor_image

    model = tiny_model_256.eval()
    rng = np.random.default_rng(1)
    slices = rng.normal(0, 300, (3, 90, 70)).astype(np.int16)
    old = torch.cat([to_tensor_image(normalize_intensity(a, "MR")) for a in slices])
    old = model.preprocess(ResizePad(model.image_size).apply_image(old))
    got, original, input_size = prepare_batch(model, slices, "MR")
    assert original == (90, 70) and input_size == (256, 199)
    assert float((got.cpu() - old).abs().max()) < 1e-3
    pred = SegMoTEPredictor(model)
    one = pred.prepare(slices[0], "MR")
    assert pred.original_size == (90, 70) and pred.input_size == (256, 199)
    assert float((one.cpu() - old[:1]).abs().max()) < 1e-3


# ----------------------------------------------------------------------------- fast_ops
def test_grouped_conv_branch_equals_conv2d():
    """The GPU branch of ``conv_to_one_channel`` (one grouped conv), run here on the CPU."""
    import torch.nn.functional as F

    from segmote_core.modeling.fast_ops import conv_to_one_channel, grouped_conv_to_one_channel

    torch.manual_seed(0)
    x = torch.randn(3, 16, 20, 17).contiguous(memory_format=torch.channels_last)
    w = torch.randn(3, 16, 3, 3)
    ref = torch.stack([F.conv2d(x[i:i + 1], w[i:i + 1], padding=1)[0, 0] for i in range(3)])
    torch.testing.assert_close(grouped_conv_to_one_channel(x, w), ref, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(conv_to_one_channel(x, w), ref, atol=1e-4, rtol=1e-5)


def test_run_stack_equals_sams_stack(tiny_model_256):
    """``run_stack`` (now the path on every device) equals SAM's own modules."""
    from segmote_core.modeling.fast_ops import run_stack

    stack = tiny_model_256.sam.mask_decoder.output_upscaling
    torch.manual_seed(0)
    x = torch.randn(2, stack[0].in_channels, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(run_stack(stack, x), stack(x), atol=1e-5, rtol=1e-5)
