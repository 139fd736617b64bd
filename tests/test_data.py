"""Fashion-MNIST loading from real IDX files, and its errors."""

import gzip
import struct

import numpy as np
import pytest
import torch

from harness.data import DataError, FashionMNIST, read_idx
from tests.conftest import fmnist_available


def write_idx(path, array: np.ndarray, compress: bool = True) -> None:
    """Writes an unsigned-byte IDX file (the format of LeCun's MNIST files)."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    (gzip.open if compress else open)(path, "wb").write(data)


def write_fake_fmnist(folder, n_train: int = 120, n_test: int = 40, seed: int = 0) -> None:
    """Small Fashion-MNIST-format files: learnable class-dependent images."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 60, (n, 28, 28))
        for i, y in enumerate(labels):
            images[i, 2 * y : 2 * y + 8, 4:24] += 180  # a bright band whose height encodes the class
        write_idx(folder / f"{split}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{split}-labels-idx1-ubyte.gz", labels)


def test_reads_idx_files_gzipped_or_not(tmp_path):
    arr = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    write_idx(tmp_path / "a.gz", arr)
    write_idx(tmp_path / "b", arr, compress=False)
    assert np.array_equal(read_idx(tmp_path / "a.gz"), arr)
    assert np.array_equal(read_idx(tmp_path / "b"), arr)


def test_truncated_file_names_the_file(tmp_path):
    arr = np.zeros((4, 28, 28))
    write_idx(tmp_path / "x", arr, compress=False)
    (tmp_path / "x").write_bytes((tmp_path / "x").read_bytes()[:-10])
    with pytest.raises(DataError, match="x: truncated"):
        read_idx(tmp_path / "x")


def test_configured_root_is_read(tmp_path):
    write_fake_fmnist(tmp_path)
    ds = FashionMNIST(root=str(tmp_path), download=False, pretrain_size=50)
    train = ds.split("train")
    assert train.images.shape == (120, 1, 28, 28) and train.images.dtype == torch.uint8
    assert train.labels.tolist()[:12] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    assert len(ds.split("test")) == 40 and len(ds.split("pretrain")) == 50


def test_missing_data_says_where_it_looked_and_how_to_fix(tmp_path, monkeypatch):
    monkeypatch.setattr("harness.data.fmnist.SYSTEM_DIRS", (str(tmp_path / "nowhere"),))
    with pytest.raises(DataError) as err:
        FashionMNIST(root=str(tmp_path / "empty"), download=False).split("train")
    msg = str(err.value)
    assert str(tmp_path / "empty") in msg and "apt-get install dataset-fashion-mnist" in msg
    assert "data.FashionMNIST.root" in msg


def test_check_returns_the_pretraining_count(tmp_path):
    write_fake_fmnist(tmp_path)
    assert FashionMNIST(root=str(tmp_path), download=False, pretrain_size=50).check() == 50
    assert FashionMNIST(root=str(tmp_path), download=False).check() == 120
    with pytest.raises(DataError, match=r"data.FashionMNIST.pretrain_size = 0"):
        FashionMNIST(root=str(tmp_path), download=False, pretrain_size=0).check()


def test_check_on_missing_or_broken_files_names_the_gin_key(tmp_path, monkeypatch):
    monkeypatch.setattr("harness.data.fmnist.SYSTEM_DIRS", (str(tmp_path / "nowhere"),))
    monkeypatch.delenv("SSLBENCH_DATA", raising=False)
    with pytest.raises(DataError) as err:
        FashionMNIST(root=str(tmp_path / "empty"), download=False).check()
    assert str(tmp_path / "empty") in str(err.value) and "data.FashionMNIST.root" in str(err.value)
    write_fake_fmnist(tmp_path / "broken")
    test_images = tmp_path / "broken" / "t10k-images-idx3-ubyte.gz"
    test_images.write_bytes(test_images.read_bytes()[:40])  # a cut-off download; the train files are intact
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte.gz: .*bind `data.FashionMNIST.root`"):
        FashionMNIST(root=str(tmp_path / "broken"), download=False).check()


@pytest.mark.skipif(
    not fmnist_available(), reason="Fashion-MNIST IDX files absent (apt-get install dataset-fashion-mnist)"
)
def test_real_fashion_mnist_files():
    ds = FashionMNIST(download=False)
    train, test = ds.split("train"), ds.split("test")
    assert train.images.shape == (60000, 1, 28, 28) and len(test) == 10000
    assert torch.bincount(train.labels).tolist() == [6000] * 10
    assert abs(train.images.float().mean().item() / 255 - train.mean[0]) < 1e-3


# --- image-caption data -----------------------------------------------------------


def write_caption_csv(folder, rows, header="image,caption,label", size=(12, 10)):
    """A CSV of image-caption pairs beside real PNG files (paths relative to the CSV)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    lines = [header]
    for i, (caption, label) in enumerate(rows):
        arr = rng.integers(0, 255, (size[1], size[0], 3)).astype(np.uint8)
        Image.fromarray(arr).save(folder / "img" / f"{i}.png")
        lines.append(f"img/{i}.png,{caption}" + (f",{label}" if label is not None else ""))
    (folder / "pairs.csv").write_text("\n".join(lines) + "\n")
    return folder / "pairs.csv"


def test_image_captions_reads_pairs_labels_and_subsets_keep_them_aligned(tmp_path):
    from harness.data import ImageCaptions

    rows = [(f"a photo of item {i}", "dog" if i % 3 else "cat") for i in range(9)]
    path = write_caption_csv(tmp_path, rows)
    ds = ImageCaptions(csv=str(path), test_csv=str(path), load_size=8, pretrain_size=4)
    train = ds.split("train")
    assert train.images[torch.arange(9)].shape == (9, 3, 8, 8) and train.images.shape == (9, 3, 8, 8)
    assert train.captions == [c for c, _ in rows]
    assert train.classes == ["cat", "dog"] and train.labels.tolist() == [0, 1, 1] * 3
    pre = ds.split("pretrain")
    assert len(pre) == 4
    for p, c in zip(pre.images.paths, pre.captions):  # each image keeps its own caption
        assert c == f"a photo of item {int(p.rsplit('/', 1)[1].split('.')[0])}"
    assert len(ds.split("test")) == 9


def test_image_captions_without_labels_and_without_a_test_split(tmp_path):
    from harness.data import ImageCaptions

    path = write_caption_csv(tmp_path, [("one", None), ("two", None)], header="image,caption")
    ds = ImageCaptions(csv=str(path), load_size=8)
    assert ds.split("train").labels.tolist() == [-1, -1] and ds.split("train").classes == []
    with pytest.raises(DataError, match="no test split.*data.ImageCaptions.test_csv"):
        ds.split("test")


def test_caption_csv_errors_name_the_file_the_row_and_the_fix(tmp_path):
    from harness.data import ImageCaptions

    path = write_caption_csv(tmp_path, [("a cat", "cat"), ("a dog", "dog")], header="image,text,label")
    with pytest.raises(DataError) as err:
        ImageCaptions(csv=str(path)).split("train")
    msg = str(err.value)
    assert str(path) in msg and "'caption' column" in msg and "image,caption" in msg and "image, text, label" in msg
    path = write_caption_csv(tmp_path, [("a cat", "cat"), ("a dog", "dog")])
    (tmp_path / "img" / "1.png").unlink()
    with pytest.raises(DataError) as err:
        ImageCaptions(csv=str(path)).split("train")
    msg = str(err.value)
    assert f"{path}, line 3" in msg and str(tmp_path / "img" / "1.png") in msg and "relative to the CSV's folder" in msg
    with pytest.raises(DataError, match="caption CSV not found"):
        ImageCaptions(csv=str(tmp_path / "nope.csv")).split("train")


def test_captioned_prompts_name_each_image_class_deterministically(tmp_path):
    from harness.data import Captioned

    write_fake_fmnist(tmp_path)
    templates = ["a photo of a {}.", "a sketch of the {}!", "{} again"]
    ds = Captioned(dataset=FashionMNIST(root=str(tmp_path), download=False, pretrain_size=50), templates=templates)
    train = ds.split("train")
    for caption, y in zip(train.captions, train.labels.tolist()):
        assert caption in [t.format(train.classes[y]) for t in templates]
    used = {
        next(i for i, t in enumerate(templates) if c.startswith(t.split("{}")[0]) and c.endswith(t.split("{}")[1]))
        for c in train.captions
    }
    assert used == {0, 1, 2}  # the templates are spread over the images
    again = Captioned(dataset=FashionMNIST(root=str(tmp_path), download=False), templates=templates).split("train")
    assert again.captions == train.captions
    pre = ds.split("pretrain")  # a subset: each image keeps the caption it has in train
    by_image = {bytes(img.numpy()): c for img, c in zip(train.images, train.captions)}
    assert all(by_image[bytes(img.numpy())] == c for img, c in zip(pre.images, pre.captions))
    assert ds.name == "fashion_mnist" and ds.split("test").captions is not None
    with pytest.raises(ValueError, match="data.Captioned.templates"):
        Captioned(dataset=ds, templates=["no slot"])


def test_test_labels_unknown_to_train_name_the_csv_line_and_label(tmp_path):
    from harness.data import ImageCaptions

    train = write_caption_csv(tmp_path / "train", [("a cat", "cat"), ("a dog", "dog")])
    test = write_caption_csv(tmp_path / "test", [("a dog", "dog"), ("a cat", "cat"), ("a cow", "cow")])
    ds = ImageCaptions(csv=str(train), test_csv=str(test), load_size=8)
    assert ds.split("train").classes == ["cat", "dog"]
    with pytest.raises(DataError) as err:
        ds.split("test")
    msg = str(err.value)
    assert f"{test}, line 4: label 'cow'" in msg and str(train) in msg and "Fix: add images labelled 'cow'" in msg
    with pytest.raises(DataError, match="line 4: label 'cow'"):
        ImageCaptions(csv=str(train), test_csv=str(test), load_size=8).check()
    subset = write_caption_csv(tmp_path / "subset", [("a dog", "dog"), ("a dog", "dog")])  # a test missing cat
    ds = ImageCaptions(csv=str(train), test_csv=str(subset), load_size=8)
    assert ds.split("test").classes == ["cat", "dog"] and ds.split("test").labels.tolist() == [1, 1]
    unlabelled = write_caption_csv(tmp_path / "web", [("one", None), ("two", None)], header="image,caption")
    ds = ImageCaptions(csv=str(unlabelled), test_csv=str(test), load_size=8)  # web pairs: the classes are the test's
    assert ds.split("test").classes == ["cat", "cow", "dog"] and ds.split("train").classes == ["cat", "cow", "dog"]


def test_caption_data_check_counts_and_names_the_gin_key(tmp_path):
    from harness.data import Captioned, ImageCaptions

    path = write_caption_csv(tmp_path, [(f"photo {i}", None) for i in range(5)], header="image,caption")
    assert ImageCaptions(csv=str(path), load_size=8, pretrain_size=3).check() == 3
    with pytest.raises(DataError, match=r"caption CSV not found: .*nope.csv\. Fix: bind `data.ImageCaptions.test_csv`"):
        ImageCaptions(csv=str(path), test_csv=str(tmp_path / "nope.csv")).check()
    with pytest.raises(DataError, match="need labelled images"):  # captions from class names of unlabelled pairs
        Captioned(dataset=ImageCaptions(csv=str(path), load_size=8)).check()
    write_fake_fmnist(tmp_path / "fmnist")
    fmnist = FashionMNIST(root=str(tmp_path / "fmnist"), download=False, pretrain_size=50)
    assert Captioned(dataset=fmnist).check() == 50


def test_warnings_for_unlabelled_and_one_class_splits(tmp_path):
    from harness.data import ImageCaptions, warnings_for

    path = write_caption_csv(tmp_path / "web", [("one", None), ("two", None)], header="image,caption")
    (warning,) = warnings_for(ImageCaptions(csv=str(path)).split("train"))
    assert "no labels" in warning
    path = write_caption_csv(tmp_path / "cats", [("a cat", "cat"), ("another cat", "cat")])
    (warning,) = warnings_for(ImageCaptions(csv=str(path)).split("train"))
    assert warning == "the train split has 1 class ('cat'): every classification accuracy is trivially 100 %"
    write_fake_fmnist(tmp_path / "fmnist")
    assert warnings_for(FashionMNIST(root=str(tmp_path / "fmnist"), download=False).split("train")) == []
