"""docs/options.md: the support table of :mod:`pych.config.support` as a page, every key of
every ``pych`` option and every field of every API body with what pych does with it.

``python -m pych.config.options_page > docs/options.md`` (``make options``) writes it; a unit
test checks the committed page is current.
"""

from __future__ import annotations


from pych.config.base import ApiModel, CliModel, _grammar
from pych.config.devices import RATE_LIMITER_KEYS
from pych.config.support import (CLI_KEYS, CLI_OPTIONS, ENDPOINT_REFUSALS, PROCESS_OPTIONS,
                                 SUPPORT, Entry, Refused,
                                 Works, _field_path, _json, _models_of_annotation)
from pych.config.vm import VmConfig

_INTRO = """\
# Options and fields: what pych does with each

Every key of every `pych` command line option and every field of every API request body,
and what pych does with it: **works**, or **refused** with the reason. pych never ignores a
field silently: a refused field that holds anything but an accepted value (its default,
`null`, an empty list, and what the table adds) is refused at once, by `vm.create`, by every
`vm.add-*` and by the command line before anything is built, with HTTP 400 and one line
naming the field and the value:

    cpus.kvm_hyperv=true is not supported by pych: pych offers the guest no Hyper-V enlightenments
    pych: error: --cpus kvm_hyperv=on is not supported by pych: pych offers the guest no Hyper-V enlightenments

Defaults are always accepted, because clients (Kata Containers, ch-remote, `vm.info`'s own
`config` sent back) write many fields at their default values. Where a default has no effect
in pych, the notes say so.

"Works" is checked: every field and key marked so has a probe in the unit tests
(`tests/unit/config/effects.py`) that sets it to a value other than its default, builds what
pych builds from it (the VM assembled on a recording fake KVM: its devices, guest RAM, ACPI
and SMBIOS tables, boot information) and asserts the value's effect there; each probe is also
run with its field dropped on the way to the VM, and must then fail. The few effects only a
guest shows name the guest test that shows them.

This page is generated from the table in `pych/config/support.py`
(`make options`: `python -m pych.config.options_page > docs/options.md`; a unit test checks it
is current), the same table `VmConfig.validate()` checks configurations against.
"""


def _walk() -> tuple[dict[type[ApiModel], str], dict[type[ApiModel], tuple[str, Refused]]]:
    """The models reachable from VmConfig through fields that work, with their first path,
    and those reached only through a refused field, with that field's path and entry."""
    reached: dict[type[ApiModel], str] = {VmConfig: ""}
    refused_with: dict[type[ApiModel], tuple[str, Refused]] = {}
    queue: list[type[ApiModel]] = [VmConfig]
    while queue:
        model = queue.pop(0)
        for name, field in model.model_fields.items():
            rule = SUPPORT[model][name]
            path = f"{reached[model]}.{name}".lstrip(".")
            is_list = "list" in str(field.annotation)
            for sub in _models_of_annotation(field.annotation):
                sub_path = path + ("[]" if is_list else "")
                if isinstance(rule, Works):
                    if sub not in reached:
                        reached[sub] = sub_path
                        queue.append(sub)
                elif sub not in refused_with:
                    refused_with[sub] = (sub_path, rule)
    pending = list(refused_with)
    while pending:           # what the refused models hold is refused with them
        model = pending.pop(0)
        for field in model.model_fields.values():
            for sub in _models_of_annotation(field.annotation):
                if sub not in refused_with and sub not in reached:
                    refused_with[sub] = refused_with[model]
                    pending.append(sub)
    for model in reached:
        refused_with.pop(model, None)
    return reached, refused_with


def _cli_keys(model: type[ApiModel]) -> dict[str, list[str]]:
    """Per field of ``model``, the CLI keys that fill it."""
    keys: dict[str, list[str]] = {}
    if not issubclass(model, CliModel):
        return keys
    grammar = _grammar(model)
    for name, cli in grammar.keys:
        keys.setdefault(name, []).append(cli.key or name)
        if cli.deprecated is not None:
            keys[name].append(f"{cli.deprecated} (deprecated)")
    for group in grammar.groups:
        if group is RATE_LIMITER_KEYS:
            keys["rate_limiter_config"] = list(group.keys)
        else:  # the console modes
            keys["mode"] = [*group.flags, *(f"{key}=" for key in group.keys)]
            for key in group.keys:
                keys[key] = [f"{key}=<path>"]
    return keys


def _keys_in_place(model: type[ApiModel], path: str) -> dict[str, list[str]]:
    """Per field of ``model`` (found at ``path``), how the command line gives it: its CLI
    keys, the ``pych`` option that fills it, or the key of the enclosing option's model it
    is part of (``cpus.topology``'s fields: part of ``topology``)."""
    keys = _cli_keys(model)
    base = path.replace("[]", "")
    options: dict[str, list[str]] = {}
    for option, option_path in CLI_OPTIONS.items():
        options.setdefault(option_path, []).append(option)
    for name in model.model_fields:
        if name not in keys and (given := options.get(f"{base}.{name}".lstrip("."))):
            keys[name] = given
    if not issubclass(model, CliModel) and "." in base:
        parent_path, field = base.rsplit(".", 1)
        parent, _ = _field_path(parent_path + "." + field)
        parent_keys = _cli_keys(parent).get(field)
        if parent_keys:
            option = getattr(parent, "CLI_OPTION", "")
            for name in model.model_fields:
                keys.setdefault(name, [f"part of `{option} {parent_keys[0]}`"])
    return keys


def _code(items: list[str]) -> str:
    return ", ".join(item if item.startswith("part of ") else f"`{item}`" for item in items)


def _accepted(model: type[ApiModel], field: str, rule: Refused) -> str:
    if rule.accepted:
        return rule.accepted
    default = model.model_fields[field].get_default(call_default_factory=True)
    if default is None:
        return "`null` (the default), `[]`" if "list" in str(
            model.model_fields[field].annotation) else "`null` (the default)"
    return f"`{_json(default)}` (the default)"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _details(model: type[ApiModel], field: str, rule: Entry) -> str:
    if isinstance(rule, Works):
        return rule.note
    text = f"{rule.reason}. Accepted: {_accepted(model, field, rule)}."
    return f"{text} {rule.note}" if rule.note else text


def _endpoints() -> dict[type, list[str]]:
    from pych.api.routes import ROUTES

    by_model: dict[type, list[str]] = {}
    for route in ROUTES:
        if route.body is not None:
            by_model.setdefault(route.body, []).append(f"{route.endpoint}")
    return by_model


def markdown() -> str:
    """docs/options.md: the command line options, then every model's fields and CLI keys."""
    from pych.api.routes import ROUTES

    reached, refused_with = _walk()
    endpoints = _endpoints()
    out = [_INTRO, "## Command line options\n",
           "| Option | Configures | Status |", "|---|---|---|"]
    for option, path in CLI_OPTIONS.items():
        model, field = _field_path(path)
        rule = SUPPORT[model][field]
        if isinstance(rule, Refused) and model is VmConfig:
            status = f"refused: {rule.reason}"
        else:
            subs = _models_of_annotation(model.model_fields[field].annotation)
            status = (f"works; its keys: [{subs[0].__name__}](#{subs[0].__name__.lower()})"
                      if subs else "works" if isinstance(rule, Works)
                      else f"refused: {rule.reason}")
        out.append(f"| `{option}` | `{path}` | {_cell(status)} |")
    for option, rule in PROCESS_OPTIONS.items():
        status = "works" if isinstance(rule, Works) else f"refused: {rule.reason}"
        if isinstance(rule, Works) and rule.note:
            status += f" ({rule.note})"
        out.append(f"| `{option}` | the pych process | {_cell(status)} |")

    out += ["", "## Fields and keys\n",
            "Each model of the API, with the CLI keys that fill its fields.\n"]
    for model, path in reached.items():
        where = []
        if path:
            where.append(f"field `{path}`")
        if option := getattr(model, "CLI_OPTION", None):
            where.append(f"option `{option}`")
        where += [f"`{endpoint}`" for endpoint in endpoints.get(model, [])]
        intro = ", ".join(where)
        out += [f"### {model.__name__}\n", f"{intro[:1].upper()}{intro[1:]}.\n" if where else "",
                "| Field | CLI key | Status | Why / notes |", "|---|---|---|---|"]
        keys = _keys_in_place(model, path)
        for name in model.model_fields:
            rule = SUPPORT[model][name]
            status = "works" if isinstance(rule, Works) else "**refused**"
            out.append(f"| `{name}` | {_code(keys.get(name, [])) or '—'} | {status} | "
                       f"{_cell(_details(model, name, rule))} |")
        for (cli_model, key), rule in CLI_KEYS.items():
            if cli_model is model and key in getattr(model, "CLI_IGNORED_KEYS", ()):
                out.append(f"| — | `{key}` | **refused** | {_cell(rule.reason)} |")
        out.append("")

    out += ["## Refused with their field\n",
            "Models that only refused fields hold: any of them is refused with that field, "
            "whatever its own fields say.\n",
            "| Model | Refused with | Its fields (CLI keys) |", "|---|---|---|"]
    for model, (path, rule) in refused_with.items():
        keys = _cli_keys(model)
        fields = ", ".join(
            f"`{name}`" + (f" ({_code(keys[name])})" if keys.get(name, [name]) != [name] else "")
            for name in model.model_fields)
        names = [model.__name__]
        if option := getattr(model, "CLI_OPTION", None):
            names.append(f"`{option}`")
        names += [f"`{endpoint}`" for endpoint in endpoints.get(model, [])]
        out.append(f"| {', '.join(names)} | `{path}`: {_cell(rule.reason)} | {_cell(fields)} |")

    out += ["", "## Other requests\n",
            "| Endpoint | Body | Status |", "|---|---|---|"]
    device_models = set(reached) | set(refused_with)
    for route in ROUTES:
        if route.body is None or route.body in device_models:
            continue
        fields = _code(list(route.body.model_fields))
        refusals = ENDPOINT_REFUSALS.get(route.endpoint, {})
        status = ("works: every field" if route.implemented and not refusals
                  else "works; refused (400) when given: " + "; ".join(
                      f"`{name}`: {why}" for name, why in refusals.items())
                  if route.implemented
                  else f"refused as a whole: answers 500 \"{route.endpoint} is not supported "
                       "by pych yet\"")
        out.append(f"| `{route.endpoint}` | {route.body.__name__}: {fields} | {status} |")
    unimplemented = [route.endpoint for route in ROUTES
                     if not route.implemented and route.body in device_models]
    out += ["", "Hot plug endpoints of refused kinds answer 500 (\"<endpoint> is not supported "
            f"by pych yet\"): {_code(unimplemented)}.", ""]
    return "\n".join(out)


if __name__ == "__main__":
    print(markdown(), end="")
