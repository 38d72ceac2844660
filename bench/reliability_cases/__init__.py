"""The cases of ``bench/reliability.py`` (issue 14), one module per kind of fault; the integration tests
(``tests/integration/test_reliability.py``) run the same functions at a small size."""
