"""Datasets as in-memory uint8 tensors, read from their real on-disk formats.

Fashion-MNIST (Xiao et al. 2017) is the embedded default: the IDX files of Debian's
``dataset-fashion-mnist`` package, else a configured folder, else torchvision's download.
`CIFAR10` and `CIFAR100` read torchvision's pickled batches (``cifar-10-batches-py/``).
`ImageFolder` reads ImageNet-style ``split/class/image`` trees, decoding on demand.
Image-text data: `ImageCaptions` reads a CSV of image paths and captions; `Captioned`
gives any labelled dataset captions made from its class names and prompt templates.

Modules: `base` (`ImageSet`, `DataError`, the `Dataset` protocol, `CachedSplits`, the split
logic every dataset inherits), `fmnist`, `files` (the PIL decoder, image files and folders,
``python -m harness.data verify DIR``) and `captions`. A new dataset implements `Dataset`,
usually by subclassing `CachedSplits` and writing `read_split`.
"""

from harness.data.base import CachedSplits, DataError, Dataset, ImageSet, check_pretrain_size, probe, warnings_for
from harness.data.captions import (
    PROMPT_TEMPLATES,
    Captioned,
    CaptionRows,
    ImageCaptions,
    image_keys,
    read_caption_csv,
    with_captions,
)
from harness.data.cifar import CIFAR10, CIFAR100, read_batch
from harness.data.files import (
    IMAGE_EXTENSIONS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageFiles,
    ImageFolder,
    class_dirs,
    decode,
    main,
    read_class_file,
    scan_folder,
    verify,
)
from harness.data.fmnist import FMNIST_CLASSES, FMNIST_FILES, SYSTEM_DIRS, FashionMNIST, read_idx

__all__ = [
    "CIFAR10",
    "CIFAR100",
    "read_batch",
    "CachedSplits",
    "DataError",
    "Dataset",
    "ImageSet",
    "check_pretrain_size",
    "probe",
    "warnings_for",
    "PROMPT_TEMPLATES",
    "CaptionRows",
    "Captioned",
    "ImageCaptions",
    "image_keys",
    "read_caption_csv",
    "with_captions",
    "IMAGE_EXTENSIONS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageFiles",
    "ImageFolder",
    "class_dirs",
    "decode",
    "main",
    "read_class_file",
    "scan_folder",
    "verify",
    "FMNIST_CLASSES",
    "FMNIST_FILES",
    "SYSTEM_DIRS",
    "FashionMNIST",
    "read_idx",
]
