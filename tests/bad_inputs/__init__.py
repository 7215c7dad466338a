"""The bad-input corpus: ``make_corpus.make_corpus(root, model_dir)`` writes every case's files and
returns the cases; ``tests/test_bad_inputs.py`` runs them."""
