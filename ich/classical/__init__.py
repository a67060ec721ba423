"""The source papers' pipelines without end-to-end training: frozen-backbone features with scikit-learn
classifiers (features, classifiers, fit) and the saved classifiers (saving)."""
