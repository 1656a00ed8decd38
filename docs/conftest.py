"""pytest runs the ``>>>`` examples in ``docs/*.md``; the docs' Python files are build tools.

``griffe_rst.py`` is a Griffe extension for the mkdocs build; it imports griffe, which only
the ``docs`` extra installs, so ``--doctest-modules`` must not import it.
"""

collect_ignore = ["griffe_rst.py"]
