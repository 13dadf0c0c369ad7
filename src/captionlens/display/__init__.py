"""How explanations are drawn, one rule for every place they are shown: the colour scales of heatmaps
(``scales.py``: figures, the HTML report, the viewer) and an Explanation's own views for Python and
notebooks (``notebook.py``: ``exp.plot()``, ``exp.overlay()``, ``exp.heatmap()``, ``_repr_html_``).
It sits beside ``explain`` — an Explanation draws itself through it — below ``report`` and ``viewer``."""
