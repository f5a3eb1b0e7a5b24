"""slimfx.forms: one registered :class:`Form` per decision kind (see ``registry``).

Importing this package registers the built-in forms (``builtin``), then the attention forms
of the form folders (``kv.form``, ``mla.form``: configs and the registry only). It imports
nothing from slimfx above ``slimfx.planning``; pieces of other layers are named and resolved on
demand.
"""

from slimfx.forms import builtin  # noqa: E402,F401,I001  (registers the built-in forms)
from slimfx.forms.kv import form as _kv_form  # noqa: E402,F401,I001  (the KV-cache forms)
from slimfx.forms.mla import form as _mla_form  # noqa: E402,F401,I001  (the MLA form)
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
