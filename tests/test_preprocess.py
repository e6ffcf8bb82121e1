from __future__ import annotations

import cv2
import numpy as np
import pytest

from hrnet_core.contract import DEFAULT_PREPROCESS, PreprocessConfig
from hrnet_core.errors import ImageError
from hrnet_core.labels import Labels, imagenet_labels
from hrnet_core.preprocess import (
    MAX_PIXELS,
    center_crop,
    decode,
    load_tensor,
    load_tensors,
    max_file_bytes,
    preprocess,
    read_image,
    resize_short,
)
from hrnet_core.samples import sample_images


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
    [
        (b"", "the file is empty"),
        (b"hello, not an image", "not a decodable image"),
        (b"%PDF-1.4", "not a decodable image"),
    ],
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


def test_read_image_refuses_a_fifo_when_given_one_without_waiting_for_a_writer(tmp_path):
    import os
    import threading

    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    done = threading.Event()

    def unblock_a_reader():  # a reader that opened the FIFO blocking would hang: give it an end of file
        while not done.wait(0.2):
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:  # no reader
                pass

    threading.Thread(target=unblock_a_reader, daemon=True).start()
    try:
        with pytest.raises(ImageError, match=r"pipe.jpg: not a regular file \(a FIFO \(named pipe\)\)"):
            read_image(fifo)
    finally:
        done.set()


def test_read_image_refuses_a_directory_when_given_one(tmp_path):
    (tmp_path / "folder.jpg").mkdir()
    with pytest.raises(ImageError, match=r"folder.jpg: not a regular file \(a directory\)"):
        read_image(tmp_path / "folder.jpg")


def test_load_tensor_refuses_a_file_unread_when_it_is_over_max_bytes():
    rocket = next(p for p in sample_images() if p.name == "rocket.jpg")
    size = rocket.stat().st_size
    with pytest.raises(ImageError, match=f"rocket.jpg: the file is {size:,} bytes, over the limit of {size - 1:,}"):
        load_tensor(rocket, max_bytes=size - 1)
    assert load_tensor(rocket, max_bytes=size).shape == (3, 224, 224)
    # the default admits an uncompressed 8-bit RGB image of the pixel limit
    assert max_file_bytes() == 3 * MAX_PIXELS + 2**20 and max_file_bytes(100) == 300 + 2**20


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


def test_load_tensor_equals_paddleclas_deploy_pipeline_bit_for_bit_on_every_sample():
    from paddleclas_reference import paddleclas_deploy_tensor

    for path in sample_images():
        assert np.array_equal(load_tensor(path), paddleclas_deploy_tensor(path)), path.name


# Images that are not plain 8-bit RGB. Each is written here from a sample photograph; the rule
# is "what cv2.imread does", so PaddleClas's own pipeline (which starts with cv2.imread) is the
# reference, and a second assertion pins down what that rule means for the case.
def _photo() -> np.ndarray:
    return read_image(next(p for p in sample_images() if p.name == "chelsea.png"))  # 451x300 RGB


def _write(path, rgb_or_gray: np.ndarray, **params) -> None:
    arr = rgb_or_gray
    if arr.ndim == 3:
        arr = arr[:, :, [2, 1, 0, *range(3, arr.shape[2])]]  # OpenCV writes BGR(A)
    assert cv2.imwrite(str(path), arr, [int(k) for kv in params.items() for k in kv])


def _odd_images(tmp_path):
    from PIL import Image

    rgb = _photo()
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    cases = {}
    _write(p := tmp_path / "gray.png", gray)
    cases["grayscale"] = (p, np.dstack([gray] * 3))
    _write(
        p := tmp_path / "rgba.png", np.dstack([rgb, np.arange(rgb.size // 3, dtype=np.uint8).reshape(rgb.shape[:2])])
    )
    cases["RGBA (alpha dropped, not composited)"] = (p, rgb)
    _write(p := tmp_path / "deep.png", rgb.astype(np.uint16) * 257 + 100)
    cases["16-bit PNG (high byte kept)"] = (p, ((rgb.astype(np.uint16) * 257 + 100) >> 8).astype(np.uint8))
    Image.fromarray(rgb).convert("CMYK").save(p := tmp_path / "cmyk.jpg", quality=95)
    cases["CMYK JPEG"] = (p, None)
    im = Image.fromarray(rgb)
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    im.save(p := tmp_path / "exif6.jpg", quality=95, exif=exif)
    cases["EXIF orientation 6"] = (p, None)
    _write(p := tmp_path / "tiny.png", cv2.resize(rgb, (16, 11), interpolation=cv2.INTER_AREA))
    cases["16x11, smaller than the crop"] = (p, None)
    return cases


def test_odd_images_follow_cv2_imread_and_so_match_paddleclas(tmp_path):
    from paddleclas_reference import paddleclas_deploy_tensor

    for case, (path, expected_rgb) in _odd_images(tmp_path).items():
        rgb = read_image(path)
        assert rgb.dtype == np.uint8 and rgb.shape[2] == 3, case
        assert np.array_equal(rgb, cv2.imread(str(path))[:, :, ::-1]), case
        if expected_rgb is not None:
            assert np.array_equal(rgb, expected_rgb), case
        assert np.array_equal(load_tensor(path), paddleclas_deploy_tensor(path)), case


def test_exif_orientation_is_applied(tmp_path):
    path, _ = _odd_images(tmp_path)["EXIF orientation 6"]
    rgb = read_image(path)
    assert rgb.shape[:2] == (451, 300)  # stored 451 wide, displayed 300 wide
    upright = cv2.rotate(
        cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION),
        cv2.ROTATE_90_CLOCKWISE,
    )
    assert np.array_equal(rgb, upright[:, :, ::-1])


def test_cmyk_jpeg_keeps_its_colours(tmp_path):
    path, _ = _odd_images(tmp_path)["CMYK JPEG"]
    assert np.abs(read_image(path).astype(int) - _photo()).mean() < 3  # JPEG loss only, no inversion


def test_decompression_bomb_is_refused_from_its_header(tmp_path, png_header_only):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header_only(100_000, 100_000))
    with pytest.raises(
        ImageError,
        match=r"bomb.png: the header says 100000x100000 = 10,000,000,000 pixels, over the limit of 89,478,485",
    ):
        load_tensor(bomb)


def test_pixel_limit_is_configurable():
    path = next(p for p in sample_images() if p.name == "camera.png")  # 512x512
    with pytest.raises(ImageError, match="262,144 pixels, over the limit of 100,000"):
        read_image(path, max_pixels=100_000)
    assert load_tensor(path, max_pixels=512 * 512).shape == (3, 224, 224)


def test_extreme_aspect_ratio_is_refused_before_resizing(tmp_path):
    _write(p := tmp_path / "sliver.png", np.zeros((1, 5000, 3), np.uint8))  # -> 1,280,000 x 256 after resizing
    with pytest.raises(ImageError, match="sliver.png: resizing it would make 1280000x256"):
        load_tensor(p)
    assert MAX_PIXELS == 89_478_485


def test_load_tensors_keeps_order_and_reports_bad_files_in_place(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"")
    paths = [*sample_images()[:2], bad, *sample_images()[2:4]]
    out = load_tensors(paths, workers=2)
    assert isinstance(out[2], ImageError) and "bad.jpg: the file is empty" in str(out[2])
    for path, tensor in zip(paths[:2] + paths[3:], out[:2] + out[3:]):
        assert np.array_equal(tensor, load_tensor(path))
