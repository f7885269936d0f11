"""The entry points: each ``launch/X.py`` runs as ``python launch/X.py`` from a checkout and, installed, as the
console script ``bert-X`` (``[project.scripts]`` in pyproject.toml names each file's ``run``)."""
