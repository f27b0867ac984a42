"""Measure E5-V: the paper's benchmarks exactly as the official evaluation runs them, and
retrieval on your own data (``e5v eval``).

- :mod:`~e5v.evaluation.metrics`: CLIP-style and BEIR recall, MRR, nDCG, Spearman (numpy)
- :mod:`~e5v.evaluation.data`: the benchmarks' datasets, from ``--data-dir`` or the Hub
- :mod:`~e5v.evaluation.image_text`, :mod:`~e5v.evaluation.composed`,
  :mod:`~e5v.evaluation.sts`: Flickr30K, COCO, I2I-Flickr30K; CIRR, FashionIQ; STS
- :mod:`~e5v.evaluation.paper`: the task list, the paper's and MTEB's published figures
- :mod:`~e5v.evaluation.benchmarks`: load a benchmark's data and run it
- :mod:`~e5v.evaluation.encoder`: chunked, cached embedding for the benchmarks
- :mod:`~e5v.evaluation.render`: captions drawn as images (I2I-Flickr30K)
- :mod:`~e5v.evaluation.retrieval`: your queries, corpus and qrels (BEIR's layout)
- :mod:`~e5v.evaluation.report`: the table and the JSON report
- :mod:`~e5v.evaluation.mteb`: a model object for ``mteb.evaluate`` (needs ``mteb``)

The datasets need the ``eval`` extra (``pip install "e5v[eval]"``); the metrics and
own-data retrieval do not.
"""
