"""``fedit ui``: a local web page over one loaded model (FastAPI + a page of plain HTML and JS).

- :mod:`fedit.ui.app`: the routes; :mod:`fedit.ui.jobs`: long work on a worker thread, polled;
- :mod:`fedit.ui.session`: the model and the stack of edits made on it;
- :mod:`fedit.ui.measure`: target probabilities and greedy generations per prompt;
- :mod:`fedit.ui.facts`, :mod:`fedit.ui.reports`, :mod:`fedit.ui.store_view`: what the panels read.

Only this package imports FastAPI (the ``[ui]`` extra)."""
