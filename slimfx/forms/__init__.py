"""slimfx.forms: one registered :class:`Form` per decision kind (see ``registry``).

Importing this package registers the built-in forms (``builtin``). It imports nothing from
slimfx above ``slimfx.planning``; pieces of other layers are named and resolved on demand.
"""

from slimfx.forms import builtin  # noqa: E402,F401,I001  (registers the built-in forms)
from slimfx.forms.registry import (
    PIECES,
    Form,
    NotSupported,
    UnknownFormError,
    form_of,
    form_of_op,
    forms,
    register_form,
    resolve,
    unregister_form,
)

__all__ = [
    "PIECES",
    "Form",
    "NotSupported",
    "UnknownFormError",
    "form_of",
    "form_of_op",
    "forms",
    "register_form",
    "resolve",
    "unregister_form",
]
