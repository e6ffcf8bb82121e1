from __future__ import annotations

import cv2
import numpy as np
import pytest

from hrnet_client.preprocess import center_crop, decode, preprocess, read_image, resize_short
from hrnet_client.samples import sample_images
from hrnet_triton.contract import DEFAULT_PREPROCESS, Labels, PreprocessConfig, imagenet_labels
from hrnet_triton.errors import ImageError


def test_preprocess_gives_float32_chw_224_for_every_sample():
    for path in sample_images():
        x = preprocess(read_image(path))
        assert x.shape == (3, 224, 224) and x.dtype == np.float32 and x.flags.c_contiguous


def test_resize_short_rounds_the_long_side_like_paddleclas():
    img = np.zeros((300, 451, 3), np.uint8)  # chelsea.png's size
    assert resize_short(img, 256).shape == (256, int(round(451 * 256 / 300)), 3)


def test_center_crop_takes_the_floor_offset():
    img = np.arange(5 * 7).reshape(5, 7, 1).astype(np.uint8)
    crop = center_crop(img, 2)
    assert crop[0, 0, 0] == img[(5 - 2) // 2, (7 - 2) // 2, 0]


def test_normalisation_uses_paddleclas_scale_mean_and_std():
    img = np.full((256, 256, 3), 255, np.uint8)
    x = preprocess(img)
    expect = (np.float32(255) * np.float32(0.00392157) - np.float32(0.485)) / np.float32(0.229)
    assert x[0, 0, 0] == expect


def test_grayscale_images_are_read_as_three_equal_channels():
    camera = read_image(next(p for p in sample_images() if p.name == "camera.png"))
    assert camera.shape[2] == 3 and np.array_equal(camera[..., 0], camera[..., 2])


def test_decode_returns_rgb_order():
    bgr = np.zeros((4, 4, 3), np.uint8)
    bgr[..., 0] = 255  # blue in OpenCV's order
    ok, png = cv2.imencode(".png", bgr)
    rgb = decode(png.tobytes())
    assert rgb[0, 0].tolist() == [0, 0, 255]


@pytest.mark.parametrize(
    "content,message",
    [(b"", "the file is empty"), (b"GIF89a garbage", "not a decodable image"), (b"%PDF-1.4", "not a decodable image")],
)
def test_bad_files_raise_image_error_naming_the_file(tmp_path, content, message):
    path = tmp_path / "bad.jpg"
    path.write_bytes(content)
    with pytest.raises(ImageError, match=f"bad.jpg: {message}"):
        read_image(path)


@pytest.mark.parametrize("keep", [0.5, 0.9, -2])
def test_truncated_jpeg_is_rejected(tmp_path, keep):
    data = next(p for p in sample_images() if p.name == "rocket.jpg").read_bytes()
    cut = data[:keep] if keep < 0 else data[: int(len(data) * keep)]
    path = tmp_path / "cut.jpg"
    path.write_bytes(cut)
    with pytest.raises(ImageError, match="cut.jpg: truncated JPEG"):
        read_image(path)


def test_jpeg_with_data_after_its_end_marker_is_accepted(tmp_path):
    original = next(p for p in sample_images() if p.name == "rocket.jpg")
    path = tmp_path / "trailer.jpg"
    path.write_bytes(original.read_bytes() + b"appended by a camera")
    assert np.array_equal(read_image(path), read_image(original))


def test_missing_file_is_an_image_error(tmp_path):
    with pytest.raises(ImageError, match="cannot read the file"):
        read_image(tmp_path / "absent.png")


def test_preprocess_config_rejects_inconsistent_parameters():
    with pytest.raises(ValueError, match="resize_short"):
        PreprocessConfig(resize_short=200, crop_size=224)
    with pytest.raises(ValueError, match="channel_order"):
        PreprocessConfig(channel_order="RGBA")
    assert DEFAULT_PREPROCESS.resize_short == 256 and DEFAULT_PREPROCESS.crop_size == 224


def test_imagenet_labels_are_the_thousand_paddleclas_classes():
    labels = imagenet_labels()
    assert len(labels) == 1000
    assert labels[0] == "tench, Tinca tinca" and labels[999].startswith("toilet tissue")


def test_label_list_with_a_gap_is_rejected():
    with pytest.raises(ValueError, match="line 2: expected '1 <name>'"):
        Labels.parse("0 cat\n2 dog\n")


def test_preprocess_equals_paddleclas_deploy_pipeline_on_every_sample_photograph():
    from paddleclas_reference import paddleclas_deploy_tensor

    for path in sample_images():
        ours = preprocess(read_image(path))
        ref = paddleclas_deploy_tensor(path)
        assert ref.shape == ours.shape == (3, 224, 224)
        np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0, err_msg=path.name)
