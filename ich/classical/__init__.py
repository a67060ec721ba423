"""The source papers' pipelines without end-to-end training: frozen-backbone features with scikit-learn
classifiers (features, classifiers, fit), one binary model per label (per_label), saved classifiers (saving)."""
