"""Dataset loaders against tiny fake trees of each layout."""

import os
import pickle
import warnings

import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

from skstego.datasets import (
    CITYSCAPES27_CLASSES,
    COCOSTUFF27_CLASSES,
    COCOSTUFF27_FINE_TO_COARSE,
    POTSDAM3_CLASSES,
    ImageCollection,
    load_cityscapes27,
    load_cocostuff27,
    load_image_folder,
    load_potsdam3,
)

# COCO-Stuff-27, written out again from the reference implementation's
# `fine_to_coarse` table (mhamilton723/STEGO, src/data.py, class `Coco`),
# independently of the package
COCO_TABLE = """
electronic: 71-76
appliance: 77-82
food (thing): 51-60
furniture (thing): 61-70
indoor: 83-90
kitchen: 43-50
accessory: 25-32
animal: 15-24
outdoor: 9-14
person: 0
sports: 33-42
vehicle: 1-8
ceiling: 101-102
floor: 100, 113-117
food (stuff): 120-121, 152, 169
furniture (stuff): 97, 106-107, 109, 111, 122, 129, 132, 155, 160, 164
rawmaterial: 99, 131, 138, 142
textile: 91-92, 103-104, 108, 130, 136, 140, 151, 166-167
wall: 170-176
window: 179-180
building: 94-95, 127, 150, 157, 165
ground: 110, 124-125, 135, 139, 143-144, 146, 148, 153, 158
plant: 93, 96, 118, 123, 128, 133, 141, 162, 168
sky: 105, 156
solid: 126, 134, 149, 159, 161, 181
structural: 98, 112, 137, 145, 163
water: 119, 147, 154, 177-178
"""


def _parse_coco_table():
    names, fine_to_coarse = [], {}
    for coarse, line in enumerate(COCO_TABLE.strip().splitlines()):
        name, ids = line.split(":")
        names.append(name)
        for part in ids.split(","):
            lo, _, hi = part.strip().partition("-")
            for fine in range(int(lo), int(hi or lo) + 1):
                fine_to_coarse.setdefault(fine, []).append(coarse)
    return names, fine_to_coarse


def _save(path, arr):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.asarray(arr, dtype=np.uint8)).save(path)


def _rgb(seed, h=14, w=18):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# --------------------------------------------------------------------------
# COCO-Stuff-27
# --------------------------------------------------------------------------
def test_cocostuff_table_maps_every_fine_id_once():
    names, fine_to_coarse = _parse_coco_table()
    assert names == COCOSTUFF27_CLASSES and len(names) == 27
    assert sorted(fine_to_coarse) == list(range(182))
    assert all(len(c) == 1 for c in fine_to_coarse.values())
    expected = np.array([fine_to_coarse[f][0] for f in range(182)])
    np.testing.assert_array_equal(COCOSTUFF27_FINE_TO_COARSE, expected)
    assert set(expected.tolist()) == set(range(27))


@pytest.fixture
def coco(tmp_path):
    root = tmp_path / "cocostuff"
    values = np.concatenate([np.arange(182), [255] * 10]).reshape(12, 16)
    for split in ("val2017", "train2017"):
        for k, image_id in enumerate(["000000000139", "000000000285", "000000000632"]):
            _save(root / "images" / split / f"{image_id}.jpg", _rgb(k, 12, 16))
            _save(root / "annotations" / split / f"{image_id}.png", np.roll(values, k))
    return root, values


def test_cocostuff_labels_remapped(coco):
    root, values = coco
    with pytest.warns(UserWarning, match="Coco164kFull_Stuff_Coarse_7"):
        coll = load_cocostuff27(root)  # no curated list: every image, sorted
    assert isinstance(coll, ImageCollection) and len(coll) == 3
    assert coll.classes == COCOSTUFF27_CLASSES and coll.palette.shape == (27, 3)
    _, fine_to_coarse = _parse_coco_table()
    lut = {f: c[0] for f, c in fine_to_coarse.items()}
    lut[255] = -1
    for k in range(3):
        raw = np.roll(values, k)
        expected = np.vectorize(lut.get)(raw)
        np.testing.assert_array_equal(coll.labels[k], expected)
    assert (coll.labels[0] == -1).sum() == 10
    assert coll[0].shape == (12, 16, 3) and coll[0].dtype == np.uint8
    assert (
        load_cocostuff27(root, "train", curated=False)
        .paths[0]
        .endswith(os.path.join("images", "train2017", "000000000139.jpg"))
    )


def test_cocostuff_curated_lists_are_the_references(coco):
    # The reference (src/data.py, Coco / ContrastiveSegDataset) reads
    # curated/{split}/<list> with subset=7 for "val" (the IIC fine list) and
    # subset=None, the full list, for "train"; image and label paths follow
    # the ids in list order.
    root, _ = coco
    reference_lists = {
        "val": "Coco164kFull_Stuff_Coarse_7.txt",
        "train": "Coco164kFull_Stuff_Coarse.txt",
    }
    with pytest.raises(FileNotFoundError, match="Coco164kFull_Stuff_Coarse_7"):
        load_cocostuff27(root, curated=True)
    for split in ("val2017", "train2017"):
        lists = root / "curated" / split
        lists.mkdir(parents=True)
        (lists / "Coco164kFull_Stuff_Coarse.txt").write_text(
            "000000000632\n000000000139\n\n"
        )
        (lists / "Coco164kFull_Stuff_Coarse_7.txt").write_text("000000000285\n")
    for split, name in reference_lists.items():
        folder = f"{split}2017"
        ids = [
            i.strip() for i in (root / "curated" / folder / name).read_text().split()
        ]
        coll = load_cocostuff27(root, split)  # "auto" finds the reference list
        assert coll.paths == [
            os.path.join(str(root), "images", folder, f"{i}.jpg") for i in ids
        ]
        assert coll.label_paths == [
            os.path.join(str(root), "annotations", folder, f"{i}.png") for i in ids
        ]
    assert len(load_cocostuff27(root, curated=False)) == 3
    full = load_cocostuff27(root, curated_list="Coco164kFull_Stuff_Coarse.txt")
    assert [os.path.basename(p) for p in full.paths] == [
        "000000000632.jpg",
        "000000000139.jpg",
    ]
    with pytest.raises(FileNotFoundError, match=r"missing\.txt"):
        load_cocostuff27(root, curated_list="missing.txt")


def test_cocostuff_missing_list_warns_and_true_requires_it(coco):
    root, _ = coco
    with pytest.warns(UserWarning, match="Coco164kFull_Stuff_Coarse.txt"):
        assert len(load_cocostuff27(root, "train")) == 3
    with pytest.raises(FileNotFoundError, match="train2017"):
        load_cocostuff27(root, "train", curated=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(load_cocostuff27(root, "train", curated=False)) == 3


def test_cocostuff_collection_kwargs_and_errors(coco, tmp_path):
    root, _ = coco
    coll = load_cocostuff27(root, curated=False, resolution=8, five_crop=True)
    assert len(coll) == 15
    assert coll[4].shape == (8, 8, 3) and coll.labels.stack().shape == (15, 8, 8)
    with pytest.raises(FileNotFoundError, match=r"images.val2017"):
        load_cocostuff27(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_cocostuff27(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="split"):
        load_cocostuff27(root, "test")
    with pytest.raises(TypeError, match="label_fn"):
        load_cocostuff27(root, curated=False, label_fn=abs)


# --------------------------------------------------------------------------
# Cityscapes-27
# --------------------------------------------------------------------------
@pytest.fixture
def cityscapes(tmp_path):
    root = tmp_path / "cityscapes"
    label_ids = np.arange(36).reshape(6, 6).repeat(2, 0).repeat(3, 1)  # 12 x 18
    for c, city in enumerate(["zurich", "aachen"]):
        for k in range(2):
            stem = f"{city}_00000{k}_000019"
            _save(
                root / "leftImg8bit" / "val" / city / f"{stem}_leftImg8bit.png",
                _rgb(10 * c + k, 12, 18),
            )
            gt = root / "gtFine" / "val" / city
            _save(gt / f"{stem}_gtFine_labelIds.png", label_ids)
            _save(gt / f"{stem}_gtFine_color.png", _rgb(0, 12, 18))  # not a label
    return root, label_ids


def test_cityscapes_labels_remapped(cityscapes):
    root, label_ids = cityscapes
    coll = load_cityscapes27(root)
    assert len(coll) == 4
    assert coll.classes == CITYSCAPES27_CLASSES and len(coll.classes) == 27
    assert coll.palette.shape == (27, 3)
    names = [os.path.basename(p) for p in coll.paths]
    assert names[0] == "aachen_000000_000019_leftImg8bit.png"  # sorted by city
    assert all(p.endswith("_gtFine_labelIds.png") for p in coll.label_paths)
    expected = np.where((label_ids >= 7) & (label_ids <= 33), label_ids - 7, -1)
    for lab in coll.labels:
        np.testing.assert_array_equal(lab, expected)
    assert set(np.unique(expected).tolist()) == set(range(-1, 27))
    np.testing.assert_array_equal(coll[1], _rgb(11, 12, 18))  # aachen, k = 1
    assert load_cityscapes27(root, resolution=6).labels.stack().shape == (4, 6, 6)


def test_cityscapes_errors_and_missing_gt(cityscapes, tmp_path):
    root, _ = cityscapes
    with pytest.raises(FileNotFoundError, match=r"leftImg8bit.train"):
        load_cityscapes27(root, "train")
    test_dir = root / "leftImg8bit" / "test" / "berlin"
    _save(test_dir / "berlin_000000_000019_leftImg8bit.png", _rgb(0))
    assert load_cityscapes27(root, "test").labels is None
    (root / "leftImg8bit" / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="No images"):
        load_cityscapes27(root, "empty")


# --------------------------------------------------------------------------
# Potsdam-3
# --------------------------------------------------------------------------
@pytest.fixture
def potsdam(tmp_path):
    root = tmp_path / "potsdam"
    (root / "imgs").mkdir(parents=True)
    (root / "gt").mkdir()
    rng = np.random.default_rng(0)
    fine = np.array([0, 1, 2, 3, 4, 5, 255] * 4).reshape(4, 7).repeat(2, 0)  # 8 x 7
    imgs = {}
    for k in range(4):
        img = rng.random((8, 7, 4)).astype(np.float32)  # RGB + IR, floats in [0, 1]
        imgs[f"{k}_1_2"] = img
        savemat(root / "imgs" / f"{k}_1_2.mat", {"img": img})
        if k < 3:
            savemat(root / "gt" / f"{k}_1_2.mat", {"gt": fine.astype(np.uint8)})
    (root / "labelled_train.txt").write_text("0_1_2\n1_1_2\n")
    (root / "labelled_test.txt").write_text("2_1_2\n")
    (root / "unlabelled_train.txt").write_text("3_1_2\n")
    (root / "all.txt").write_text("0_1_2\n1_1_2\n2_1_2\n3_1_2\n")
    return root, fine, imgs


def test_potsdam_labels_remapped(potsdam):
    root, fine, imgs = potsdam
    coll = load_potsdam3(root)
    assert len(coll) == 1 and coll.classes == POTSDAM3_CLASSES
    assert coll.palette.shape == (3, 3)
    coarse = {0: 0, 4: 0, 1: 1, 5: 1, 2: 2, 3: 2, 255: -1}
    np.testing.assert_array_equal(coll.labels[0], np.vectorize(coarse.get)(fine))
    img = coll[0]
    assert img.shape == (8, 7, 3) and img.dtype == np.uint8  # infrared dropped
    expected = np.rint(imgs["2_1_2"][:, :, :3].astype(np.float64) * 255)
    np.testing.assert_allclose(img, expected, atol=1)
    train = load_potsdam3(root, "labelled_train")
    assert [os.path.basename(p) for p in train.paths] == ["0_1_2.mat", "1_1_2.mat"]
    assert np.asarray(train.labels).shape == (2, 8, 7)


def test_potsdam_unlabelled_and_errors(potsdam, tmp_path):
    root, _, _ = potsdam
    unlabelled = load_potsdam3(root, "unlabelled_train")
    assert unlabelled.labels is None and unlabelled[0].shape == (8, 7, 3)
    assert load_potsdam3(root, "all").labels is None  # one tile has no gt
    with pytest.raises(FileNotFoundError, match="labelled_test"):
        load_potsdam3(root, "val")  # message lists the splits there
    with pytest.raises(FileNotFoundError, match="imgs"):
        load_potsdam3(tmp_path)
    five = load_potsdam3(root, "labelled_train", five_crop=True)
    assert len(five) == 10 and five.labels[3].shape == (4, 3)


# --------------------------------------------------------------------------
# any image folder
# --------------------------------------------------------------------------
@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "mydata"
    label = np.array([[0, 1, 2, 255]]).repeat(10, 0).repeat(4, 1)  # 10 x 16
    for k, ext in enumerate(["b.png", "a.jpg", "c.jpeg"]):
        _save(root / "imgs" / "val" / ext, _rgb(k, 10, 16))
        _save(root / "labels" / "val" / f"{ext.split('.')[0]}.png", label)
    _save(root / "imgs" / "train" / "z.png", _rgb(9, 10, 16))
    (root / "imgs" / "val" / "notes.txt").write_text("not an image")
    return root, label


def test_image_folder(folder):
    root, label = folder
    coll = load_image_folder(root)
    assert [os.path.basename(p) for p in coll.paths] == ["a.jpg", "b.png", "c.jpeg"]
    expected = np.where(label == 255, -1, label)
    np.testing.assert_array_equal(coll.labels.stack(), np.stack([expected] * 3))
    np.testing.assert_array_equal(coll[1], _rgb(0, 10, 16))
    assert coll.classes is None
    named = load_image_folder(root, classes=["x", "y", "z"], resolution=8)
    assert named.palette.shape == (3, 3) and named[0].shape == (8, 8, 3)
    train = load_image_folder(root, "train")
    assert len(train) == 1 and train.labels is None
    clone = pickle.loads(pickle.dumps(coll))
    np.testing.assert_array_equal(clone.labels[0], coll.labels[0])


def test_image_folder_errors(folder):
    root, _ = folder
    os.remove(root / "labels" / "val" / "b.png")
    with pytest.raises(FileNotFoundError, match=r"b\.png"):
        load_image_folder(root)
    with pytest.raises(FileNotFoundError, match=r"imgs.test"):
        load_image_folder(root, "test")
    (root / "imgs" / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="No images"):
        load_image_folder(root, "empty")


def test_pipeline_on_a_loaded_folder(folder):
    """Featurizer -> probe pipeline, cross-validated on a lazy collection."""
    features = pytest.importorskip("skstego.features")
    timm = pytest.importorskip("timm")
    from sklearn.model_selection import KFold, cross_val_score
    from sklearn.pipeline import Pipeline

    from skstego.probes import KMeansProbe

    root, _ = folder
    coll = load_image_folder(root, resolution=32)
    net = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=0
    )
    featurizer = features.DinoFeaturizer(net, resolution=32, device="cpu")
    maps = featurizer.fit_transform(coll)
    assert maps.shape == (3, 192, 2, 2)
    pipe = Pipeline([("features", featurizer), ("probe", KMeansProbe(k=2))])
    scores = cross_val_score(pipe, coll, coll.labels, cv=KFold(3))
    assert scores.shape == (3,) and np.isfinite(scores).all()
