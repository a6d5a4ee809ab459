"""Pretraining objectives, one LightningModule each: ``mlm`` (``MaskedGeneModeling``), ``generative``
(``GenerativePretraining``), ``value_regression`` (``ValueRegression``); ``base``: what they share
(``PretrainingModule``, ``data_facts``)."""
