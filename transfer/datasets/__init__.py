"""Datasets: the built-in demo data (``demo``), detectron2 registrations and layout checks
(``catalog``), and user datasets described by a small YAML file (``custom``)."""
