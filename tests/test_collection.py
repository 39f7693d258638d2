"""ImageCollection: lazy reading, indexing, sklearn splitters, geometry."""

import pickle

import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat
from sklearn.base import BaseEstimator
from sklearn.model_selection import KFold, cross_validate, train_test_split
from sklearn.utils import _safe_indexing

from skstego.datasets import ImageCollection, LabelCollection, LabelRemap
from skstego.datasets import _collection as collection_module


def _write_rgb(path, arr):
    Image.fromarray(np.asarray(arr, dtype=np.uint8)).save(path)
    return str(path)


def _position_pair(tmp_path, name, h, w):
    """Image with R = row, G = column; label = row * w + column."""
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([yy, xx, np.zeros_like(yy)], axis=-1)
    label = (yy * w + xx).astype(np.uint16)
    ip = _write_rgb(tmp_path / f"{name}.png", img)
    lp = str(tmp_path / f"{name}_label.png")
    Image.fromarray(label).save(lp)
    return ip, lp


@pytest.fixture
def plain(tmp_path):
    """Five small RGB images of different colours, with constant labels."""
    images, labels = [], []
    for i in range(5):
        img = np.full((12, 16, 3), (10 * i, 100, 200), dtype=np.uint8)
        images.append(_write_rgb(tmp_path / f"img{i}.png", img))
        lab = np.full((12, 16), i, dtype=np.uint8)
        lab[0, 0] = 255
        labels.append(_write_rgb(tmp_path / f"lab{i}.png", lab))
    return images, labels


# --------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------
def test_items_are_uint8_rgb_and_labels_int64(plain):
    images, labels = plain
    coll = ImageCollection(images, labels)
    assert len(coll) == 5
    img = coll[3]
    assert img.shape == (12, 16, 3) and img.dtype == np.uint8
    assert tuple(img[0, 0]) == (30, 100, 200)
    lab = coll.labels[3]
    assert lab.shape == (12, 16) and lab.dtype == np.int64
    assert lab[0, 0] == 255 and lab[5, 5] == 3  # stored values without label_fn
    assert [im[0, 0, 0] for im in coll] == [0, 10, 20, 30, 40]
    assert coll[-1][0, 0, 0] == 40
    assert isinstance(coll.labels, LabelCollection)
    assert ImageCollection(images).labels is None


def test_grayscale_rgba_palette_16bit_converted(tmp_path):
    gray = tmp_path / "gray.png"
    Image.fromarray(np.full((4, 5), 77, dtype=np.uint8), mode="L").save(gray)
    rgba = tmp_path / "rgba.png"
    Image.fromarray(np.full((4, 5, 4), (1, 2, 3, 9), dtype=np.uint8)).save(rgba)
    pal = Image.fromarray(np.zeros((4, 5), dtype=np.uint8), mode="P")
    pal.putpalette([200, 100, 50] + [0] * 765)
    pal.save(tmp_path / "pal.png")
    g16 = tmp_path / "g16.png"
    Image.fromarray(np.full((4, 5), 1000, dtype=np.uint16)).save(g16)
    coll = ImageCollection([gray, rgba, tmp_path / "pal.png", g16])
    for i in range(4):
        assert coll[i].shape == (4, 5, 3) and coll[i].dtype == np.uint8
    assert tuple(coll[0][0, 0]) == (77, 77, 77)
    assert tuple(coll[1][0, 0]) == (1, 2, 3)
    assert tuple(coll[2][0, 0]) == (200, 100, 50)
    assert tuple(coll[3][0, 0]) == (4, 4, 4)  # 1000 / 257, 16 bits to 8


def test_mat_images_and_labels(tmp_path):
    rng = np.random.default_rng(0)
    img = rng.random((6, 7, 4))  # float in [0, 1], 4 channels
    savemat(tmp_path / "a.mat", {"img": img})
    savemat(tmp_path / "b.mat", {"img": (img * 255).astype(np.uint8)})
    gt = rng.integers(0, 6, size=(6, 7)).astype(np.uint8)
    savemat(tmp_path / "gt.mat", {"gt": gt})
    coll = ImageCollection(
        [tmp_path / "a.mat", tmp_path / "b.mat"], [tmp_path / "gt.mat"] * 2
    )
    a, b = coll[0], coll[1]
    assert a.shape == (6, 7, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, np.rint(img[:, :, :3] * 255).astype(np.uint8))
    np.testing.assert_array_equal(b, (img[:, :, :3] * 255).astype(np.uint8))
    np.testing.assert_array_equal(coll.labels[0], gt)


def test_missing_and_corrupt_files_name_the_path(tmp_path, plain):
    images, labels = plain
    missing = str(tmp_path / "nope.png")
    coll = ImageCollection([images[0], missing], [labels[0], missing])
    coll[0]  # the good one reads
    with pytest.raises(FileNotFoundError, match=r"nope\.png"):
        coll[1]
    with pytest.raises(FileNotFoundError, match=r"nope\.png"):
        coll.labels[1]
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"this is not a jpeg")
    with pytest.raises(OSError, match=r"bad\.jpg"):
        ImageCollection([bad])[0]
    with pytest.raises(OSError, match=r"bad\.jpg"):
        ImageCollection([images[0]], [bad]).labels[0]
    rgb_label = ImageCollection([images[0]], [images[0]])
    with pytest.raises(OSError, match="single-channel"):
        rgb_label.labels[0]


def test_lazy_reading(plain, monkeypatch):
    images, labels = plain
    calls = []
    real = collection_module._read_image

    def counting(path):
        calls.append(path)
        return real(path)

    monkeypatch.setattr(collection_module, "_read_image", counting)
    coll = ImageCollection(images, labels, resolution=8)
    sub = coll[1:4][np.array([2, 0])]
    _safe_indexing(coll, np.array([4, 1]))
    for _train, _test in KFold(3).split(coll):
        pass
    repr(coll), coll.paths, coll.labels, len(sub)
    assert calls == []
    sub[0]
    assert calls == [images[3]]
    coll.labels[2]  # labels do not read images
    assert calls == [images[3]]


# --------------------------------------------------------------------------
# indexing and scikit-learn
# --------------------------------------------------------------------------
def test_indexing_returns_subsets(plain):
    images, labels = plain
    coll = ImageCollection(images, labels)
    assert coll[1:4].paths == images[1:4]
    assert coll[::-2].paths == images[::-2]
    assert coll[np.array([2, 0])].paths == [images[2], images[0]]
    assert coll[[4, -5]].paths == [images[4], images[0]]
    mask = np.array([True, False, True, False, True])
    assert coll[mask].paths == [images[0], images[2], images[4]]
    assert coll[[]].paths == []
    sub = coll[np.array([3, 1])]
    assert isinstance(sub, ImageCollection)
    assert sub.label_paths == [labels[3], labels[1]]
    assert sub.labels[0][5, 5] == 3
    assert coll.labels[mask][1][5, 5] == 2
    assert isinstance(coll.labels[1:3], LabelCollection)
    assert coll[np.int64(2)][0, 0, 0] == 20
    assert coll[np.array(-1)][0, 0, 0] == 40
    for bad in (5, -6, [0, 7]):
        with pytest.raises(IndexError):
            coll[bad]
    with pytest.raises(IndexError):
        coll[np.array([True, False])]
    with pytest.raises(IndexError):
        coll[np.array([0.5])]


def test_safe_indexing_and_kfold(plain):
    images, labels = plain
    coll = ImageCollection(images, labels)
    sub = _safe_indexing(coll, np.array([2, 0]))
    assert isinstance(sub, ImageCollection)
    assert sub.paths == [images[2], images[0]]
    sub_labels = _safe_indexing(coll.labels, np.array([2, 0]))
    assert isinstance(sub_labels, LabelCollection)
    assert [int(m[5, 5]) for m in sub_labels] == [2, 0]
    mask = _safe_indexing(coll, np.array([False, True, True, False, False]))
    assert mask.paths == images[1:3]
    seen = []
    for train, test in KFold(n_splits=5).split(coll):
        tr, te = _safe_indexing(coll, train), _safe_indexing(coll, test)
        assert isinstance(tr, ImageCollection) and len(tr) == 4 and len(te) == 1
        assert te[0][0, 0, 0] == 10 * test[0]
        seen.extend(te.paths)
    assert seen == images
    a, b, ya, yb = train_test_split(coll, coll.labels, test_size=2, random_state=0)
    assert isinstance(a, ImageCollection) and isinstance(ya, LabelCollection)
    assert len(a) == 3 and len(b) == 2
    assert [int(m[5, 5]) * 10 for m in yb] == [int(im[0, 0, 0]) for im in b]


def test_stack_labels(tmp_path, plain):
    images, labels = plain
    coll = ImageCollection(images, labels)
    arr = np.asarray(coll.labels)
    assert arr.shape == (5, 12, 16) and arr.dtype == np.int64
    np.testing.assert_array_equal(arr, coll.labels.stack())
    np.testing.assert_array_equal(arr[:, 5, 5], np.arange(5))
    other = _write_rgb(tmp_path / "other.png", np.zeros((7, 9), dtype=np.uint8))
    mixed = ImageCollection(images[:2], [labels[0], other])
    with pytest.raises(ValueError, match=r"differ in size.*other\.png"):
        np.asarray(mixed.labels)
    same = ImageCollection(images[:2], [labels[0], other], resolution=6)
    assert np.asarray(same.labels).shape == (2, 6, 6)


def test_label_fn_pickle_repr(plain):
    images, labels = plain
    remap = LabelRemap([-1, 0, 0, 1, 1])  # 0 -> -1, 1, 2 -> 0, 3, 4 -> 1, 255 -> -1
    coll = ImageCollection(
        images, labels, label_fn=remap, classes=["a", "b"], resolution=8
    )
    arr = coll.labels.stack()
    np.testing.assert_array_equal(arr[:, 4, 4], [-1, 0, 0, 1, 1])
    assert (ImageCollection(images, labels, label_fn=remap).labels[2][0, 0]) == -1
    assert coll.palette.shape == (2, 3) and coll.palette.dtype == np.uint8
    clone = pickle.loads(pickle.dumps(coll[1:]))
    assert clone.classes == ["a", "b"] and len(clone) == 4
    np.testing.assert_array_equal(clone.labels.stack(), arr[1:])
    np.testing.assert_array_equal(clone[0], coll[1])
    text = repr(coll)
    assert "5 images" in text and "with labels" in text and "resolution=8" in text

    bad = ImageCollection(images, labels, label_fn=lambda m: m.astype(float))
    with pytest.raises(ValueError, match="integer map"):
        bad.labels[0]


def test_parameter_validation(plain):
    images, labels = plain
    with pytest.raises(ValueError, match="5 images but 2 label"):
        ImageCollection(images, labels[:2])
    with pytest.raises(TypeError, match="single path"):
        ImageCollection(images[0])
    with pytest.raises(ValueError, match="resolution"):
        ImageCollection(images, resolution=0)
    with pytest.raises(TypeError, match="resolution"):
        ImageCollection(images, resolution=2.5)
    with pytest.raises(ValueError, match="crop"):
        ImageCollection(images, crop="random")
    with pytest.raises(ValueError, match="crop_ratio"):
        ImageCollection(images, crop_ratio=0)
    with pytest.raises(ValueError, match="palette"):
        ImageCollection(images, palette=[1, 2, 3])


# --------------------------------------------------------------------------
# geometry
# --------------------------------------------------------------------------
def test_center_crop_without_resize_is_exact(tmp_path):
    ip, lp = _position_pair(tmp_path, "p", 20, 30)
    coll = ImageCollection([ip], [lp], resolution=20)
    img, lab = coll[0], coll.labels[0]
    assert img.shape == (20, 20, 3) and lab.shape == (20, 20)
    np.testing.assert_array_equal(img[:, :, 1], np.arange(5, 25)[None].repeat(20, 0))
    # the label at every pixel is the position encoded in the image
    np.testing.assert_array_equal(lab, img[:, :, 0].astype(int) * 30 + img[:, :, 1])


def test_resize_and_center_crop_align_image_and_label(tmp_path):
    # 8 x 8 blocks, block b coloured R = 3 b and labelled b
    h, w = 48, 64
    yy, xx = np.mgrid[0:h, 0:w]
    block = (yy // 8) * 8 + xx // 8
    img = np.stack([3 * block, np.full_like(block, 50), np.zeros_like(block)], -1)
    ip = _write_rgb(tmp_path / "b.png", img)
    lp = _write_rgb(tmp_path / "b_label.png", block)
    coll = ImageCollection([ip], [lp], resolution=24)
    out, lab = coll[0], coll.labels[0]
    assert out.shape == (24, 24, 3) and lab.shape == (24, 24)
    # independent expectation: scale 1/2 (48 x 64 -> 24 x 32), then columns 4..27;
    # output pixel (y, x) is centred on source point (2 y + 1, 2 (x + 4) + 1)
    oy, ox = np.mgrid[0:24, 0:24]
    sy, sx = 2 * oy + 1, 2 * (ox + 4) + 1
    np.testing.assert_array_equal(lab, block[sy, sx])
    # the image agrees with its label wherever the pixel is inside one block
    interior = (sy % 8 >= 2) & (sy % 8 <= 5) & (sx % 8 >= 2) & (sx % 8 <= 5)
    assert interior.sum() > 100
    np.testing.assert_allclose(out[..., 0][interior], 3 * lab[interior], atol=1)


def test_crop_none_keeps_aspect(tmp_path):
    ip, lp = _position_pair(tmp_path, "p", 20, 30)
    coll = ImageCollection([ip], [lp], resolution=10, crop="none")
    assert coll[0].shape == (10, 15, 3) and coll.labels[0].shape == (10, 15)
    tall = ImageCollection(
        [_position_pair(tmp_path, "q", 30, 20)[0]], resolution=10, crop="none"
    )
    assert tall[0].shape == (15, 10, 3)


def test_five_crop_geometry(tmp_path):
    ip, lp = _position_pair(tmp_path, "p", 40, 60)
    jp, mp = _position_pair(tmp_path, "q", 21, 31)
    coll = ImageCollection([ip, jp], [lp, mp], five_crop=True)
    assert len(coll) == 10 and coll.paths == [ip] * 5 + [jp] * 5
    full = np.asarray(Image.open(ip))
    # top-left, top-right, bottom-left, bottom-right, centre; crops of 20 x 30
    boxes = [(0, 0), (0, 30), (20, 0), (20, 30), (10, 15)]
    for k, (top, left) in enumerate(boxes):
        img, lab = coll[k], coll.labels[k]
        np.testing.assert_array_equal(img, full[top : top + 20, left : left + 30])
        np.testing.assert_array_equal(lab, img[..., 0].astype(int) * 60 + img[..., 1])
    # odd sizes: int(0.5 * 21) x int(0.5 * 31) = 10 x 15 crops
    boxes = [(0, 0), (0, 16), (11, 0), (11, 16), (6, 8)]
    for k, (top, left) in enumerate(boxes):
        img, lab = coll[5 + k], coll.labels[5 + k]
        assert img.shape == (10, 15, 3)
        assert (img[0, 0, 0], img[0, 0, 1]) == (top, left)
        np.testing.assert_array_equal(lab, img[..., 0].astype(int) * 31 + img[..., 1])
    # subsets of crops keep their crop
    sub = coll[np.array([8, 1])]
    np.testing.assert_array_equal(sub[1], coll[1])
    np.testing.assert_array_equal(sub.labels[0], coll.labels[8])


def test_five_crop_then_resolution(tmp_path):
    ip, lp = _position_pair(tmp_path, "p", 40, 60)
    coll = ImageCollection([ip], [lp], five_crop=True, crop_ratio=0.5, resolution=10)
    assert len(coll) == 5
    labels = coll.labels.stack()
    assert labels.shape == (5, 10, 10)
    for k in range(5):
        img, lab = coll[k], labels[k]
        assert img.shape == (10, 10, 3)
        # label position and image position agree up to the bilinear blur
        np.testing.assert_allclose(img[..., 0], lab // 60, atol=1)
        np.testing.assert_allclose(img[..., 1], lab % 60, atol=1)
    # crop k = 1 is the top-right quarter: columns 30..59, rows 0..19
    assert labels[1].min() // 60 < 2 and labels[1].max() // 60 >= 18
    assert labels[1].min() % 60 >= 30


class _MeanRed(BaseEstimator):
    """Scores by mean red level; checks that folds arrive as lazy collections."""

    def fit(self, X, y=None):
        assert isinstance(X, ImageCollection)
        assert y is None or isinstance(y, LabelCollection)
        self.mean_ = float(np.mean([im[..., 0].mean() for im in X]))
        return self

    def score(self, X, y=None):
        assert isinstance(X, ImageCollection)
        return float(np.mean([im[..., 0].mean() for im in X])) - self.mean_


def test_cross_validate_keeps_folds_lazy(plain):
    images, labels = plain
    coll = ImageCollection(images, labels)
    res = cross_validate(_MeanRed(), coll, coll.labels, cv=KFold(5))
    # fold k tests image k (red 10 k) against the mean of the other four
    expected = [10 * k - (100 - 10 * k) / 4 for k in range(5)]
    np.testing.assert_allclose(res["test_score"], expected)
    res = cross_validate(_MeanRed(), coll, cv=KFold(2, shuffle=True, random_state=0))
    assert len(res["test_score"]) == 2


@pytest.mark.parametrize("size", [(37, 53), (80, 61), (9, 14), (320, 427)])
def test_nearest_interpolation_is_the_reference_transform(tmp_path, size):
    # The STEGO reference evaluates on T.Resize(res, NEAREST) + T.CenterCrop(res)
    # of PIL images (src/utils.py, get_transform), for images and labels alike.
    import torchvision.transforms as T
    from torchvision.transforms import InterpolationMode

    rng = np.random.default_rng(size[0])
    rgb = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    label = rng.integers(0, 27, size, dtype=np.uint8)
    _write_rgb(tmp_path / "a.png", rgb)
    Image.fromarray(label).save(tmp_path / "a_label.png")
    res = 32
    reference = T.Compose([T.Resize(res, InterpolationMode.NEAREST), T.CenterCrop(res)])
    expected = np.asarray(reference(Image.fromarray(rgb)))
    expected_label = np.asarray(reference(Image.fromarray(label)))
    coll = ImageCollection(
        [tmp_path / "a.png"],
        [tmp_path / "a_label.png"],
        resolution=res,
        interpolation="nearest",
    )
    np.testing.assert_array_equal(coll[0], expected)
    np.testing.assert_array_equal(coll.labels[0], expected_label)
    assert "interpolation='nearest'" in repr(coll)
    with pytest.raises(ValueError, match="interpolation"):
        ImageCollection([tmp_path / "a.png"], interpolation="cubic")
