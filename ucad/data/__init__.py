"""Datasets: readers (MVTec AD, VisA, plain folders), the one image loader, synthetic data."""

from ucad.data.datasets import (
    FORMATS,
    DatasetFormat,
    TaskData,
    TestSample,
    list_tasks,
    read_folder,
    read_mvtec,
    read_task,
    read_visa,
)
from ucad.data.images import (
    Geometry,
    TestSet,
    load_image,
    load_images,
    load_mask,
    load_test_set,
    to_rgb,
)

__all__ = [
    "FORMATS",
    "DatasetFormat",
    "Geometry",
    "TaskData",
    "TestSample",
    "TestSet",
    "list_tasks",
    "load_image",
    "load_images",
    "load_mask",
    "load_test_set",
    "read_folder",
    "read_mvtec",
    "read_task",
    "read_visa",
    "to_rgb",
]
