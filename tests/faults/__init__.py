import pytest

# The harness asserts the books on the tests' behalf: show the differing values, as in tests.
pytest.register_assert_rewrite("tests.faults.harness")
