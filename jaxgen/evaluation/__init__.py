"""Evaluation with learned features: the digits classifier (label accuracy, Fréchet distance, classifier score, class
balance, k-NN metrics in its feature space) and the Inception-v3 network of FID / IS, built from a weights file the
user supplies (nothing is downloaded)."""

from jaxgen.evaluation.captions import attribute_agreement
from jaxgen.evaluation.digits import (CACHE_VERSION, class_balance, classifier_accuracy, classifier_feature_fn,
                                     classifier_logits, classifier_predict, classifier_score, default_cache_dir,
                                     digits_report, digits_sample_metrics, guided_label_accuracy,
                                     load_or_train_digits_classifier, train_digits_classifier)
from jaxgen.evaluation.inception import (FIDInceptionV3, inception_feature_fn, inception_fid, inception_outputs,
                                         inception_preprocess, inception_reference_moments, inception_score,
                                         inception_score_from_logits)
from jaxgen.evaluation.inception_weights import (FID_WEIGHTS_URL, WEIGHTS_ENV, convert_inception_weights,
                                                 load_inception, read_torch_state_dict)
from jaxgen.models.classifier import DigitsClassifier

__all__ = ["attribute_agreement", "DigitsClassifier", "train_digits_classifier", "load_or_train_digits_classifier", "default_cache_dir",
           "classifier_predict", "classifier_accuracy", "classifier_feature_fn", "guided_label_accuracy",
           "digits_report", "CACHE_VERSION", "classifier_logits", "classifier_score", "class_balance",
           "digits_sample_metrics", "FIDInceptionV3", "inception_preprocess", "inception_feature_fn",
           "inception_outputs", "inception_fid", "inception_reference_moments", "inception_score",
           "inception_score_from_logits", "load_inception", "convert_inception_weights", "read_torch_state_dict",
           "FID_WEIGHTS_URL", "WEIGHTS_ENV"]
