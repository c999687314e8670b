"""The data sets' sources, each read into map-style datasets: :mod:`~nas_headprune.datasets.fashion_mnist`
(the IDX files, found or downloaded), :mod:`~nas_headprune.datasets.digits` (scikit-learn's digits) and
:mod:`~nas_headprune.datasets.imagefolder` (``train/`` and ``val/`` image folders read with timm);
:mod:`~nas_headprune.datasets.split` draws the seeded subsets and the validation split.
:mod:`nas_headprune.data` chooses among them by ``DataConfig.name`` and builds the loaders.
"""
