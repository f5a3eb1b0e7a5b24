"""Built-in rules, one file per decision family. Each form names its rule (``slimfx.forms``:
``Form.rule``); ``passes.base.rule_for`` asks the registry, which imports the file on first use.
"""
