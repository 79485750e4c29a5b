"""The one check of a ConfigError: it names the source, the object and the field, and says why."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from nodemesh.errors import ConfigError


def assert_config_error(call: Callable[[], object], source: str, obj: str, field: str, words: str) -> ConfigError:
    """`call()` raises a ConfigError naming `source`, `obj` and `field` whose message has `words`."""
    with pytest.raises(ConfigError) as err:
        call()
    e = err.value
    assert (e.source, e.obj, e.field) == (source, obj, field), str(e)
    assert words in str(e), str(e)
    return e
