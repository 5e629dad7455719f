"""Evaluation with learned features: the digits classifier, guided-label accuracy and the digits report."""

from jaxgen.evaluation.digits import (CACHE_VERSION, classifier_accuracy, classifier_feature_fn, classifier_predict,
                                     default_cache_dir, digits_report, guided_label_accuracy,
                                     load_or_train_digits_classifier, train_digits_classifier)
from jaxgen.models.classifier import DigitsClassifier

__all__ = ["DigitsClassifier", "train_digits_classifier", "load_or_train_digits_classifier", "default_cache_dir",
           "classifier_predict", "classifier_accuracy", "classifier_feature_fn", "guided_label_accuracy",
           "digits_report", "CACHE_VERSION"]
