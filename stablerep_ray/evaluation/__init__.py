"""Frozen-feature evaluation, in the order the data flows: a data spec (``specs``) names labelled
images, indexed without decoding (``sources``; ``datasets`` holds small sets in memory), a model
turns them into CLS features (``features``, streamed through Ray Data and cached by ``cache``), and
kNN or a linear probe scores them (``classifiers``). ``evaluate`` holds the two entry points: the
online kNN monitor of the training loop and the offline ``stablerep-ray eval``."""

from .cache import FeatureSet, feature_cache_path
from .classifiers import DEFAULT_C_GRID, knn_accuracy, knn_classify, linear_probe, mean_per_class_accuracy
from .datasets import LabelledImages, load_eval_split, load_labelled_images, stratified_split
from .evaluate import OnlineKNN, evaluate, online_cap
from .features import compute_feature_sets, extract_features
from .sources import ImageSource, eval_pixels, index_source
from .specs import check_data_spec, check_eval_data, dataset_class_names, is_simulator_spec, parse_data_spec, set_names

__all__ = [
    "DEFAULT_C_GRID", "FeatureSet", "ImageSource", "LabelledImages", "OnlineKNN", "check_data_spec",
    "check_eval_data", "compute_feature_sets", "dataset_class_names", "eval_pixels", "evaluate", "extract_features",
    "feature_cache_path", "index_source", "is_simulator_spec", "knn_accuracy", "knn_classify",
    "linear_probe", "load_eval_split", "load_labelled_images", "mean_per_class_accuracy",
    "online_cap", "parse_data_spec", "set_names", "stratified_split",
]
