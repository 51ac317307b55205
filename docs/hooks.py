"""MkDocs hooks of the documentation site (named in mkdocs.yml; kept out of the site by `exclude_docs`).

- `on_files`: the figures the benchmarks wrote (`benchmarks/results/*.png`) join the site as
  `results/figures/<name>.png`, so a Results page shows the very file a benchmark run produced, never a copy.
- `on_page_markdown`: a line `<!-- grape-fields -->` becomes the table of every field `GrapeTrainingArguments`
  adds to `TrainingArguments`, built from the dataclass itself (name, type, default, the rules of
  `metadata["rules"]`, the help text), so the table cannot drift from the code; a line
  `<!-- grape-recommended -->` becomes the library's table of recommended settings and published regimes
  (`grape_hf.recommended.TABLE`, `REGIMES`), with each entry's source.
"""

import dataclasses
import glob
import html
import os
import re

from mkdocs.structure.files import File

FIELDS_MARKER = "<!-- grape-fields -->"
RECOMMENDED_MARKER = "<!-- grape-recommended -->"
FIGURES = "benchmarks/results"  # relative to the repository root (mkdocs.yml's folder)


def on_files(files, config):
    root = os.path.dirname(config.config_file_path)
    for path in sorted(glob.glob(os.path.join(root, FIGURES, "*.png"))):
        files.append(File.generated(config, f"results/figures/{os.path.basename(path)}", abs_src_path=path))
    return files


def on_page_markdown(markdown, page, config, files):
    if FIELDS_MARKER in markdown:
        markdown = markdown.replace(FIELDS_MARKER, fields_table())
    if RECOMMENDED_MARKER in markdown:
        markdown = markdown.replace(RECOMMENDED_MARKER, recommended_table())
    return markdown


def recommended_table() -> str:
    """HTML tables of `grape_hf.recommended`: per (kind, training) and rule the values and their source, then
    the published regimes."""
    from grape_hf.recommended import KIND_TITLES, REGIMES, TABLE, TRAINING_TITLES

    rows = []
    for (kind, training), entries in TABLE.items():
        for rule, entry in entries.items():
            values = "<br>".join(f"<code>{name}={value!r}</code>" for name, value in entry.values.items())
            rows.append(f"<tr><td>{html.escape(KIND_TITLES[kind])}, {html.escape(TRAINING_TITLES[training])}</td>"
                        f"<td><code>{rule}</code></td><td>{values}</td><td>{inline_code(entry.source)}</td></tr>")
    table = ('<div class="grape-fields grape-recommended"><table>\n<thead><tr><th>model</th><th>rule</th><th>values</th>'
             "<th>measured by</th></tr></thead>\n<tbody>\n" + "\n".join(rows) + "\n</tbody></table></div>")
    regimes = []
    for (model_type, rule), regime in REGIMES.items():
        fields = {**regime.trainer, **regime.model}
        values = "<br>".join(f"<code>{name}={value!r}</code>" for name, value in fields.items())
        regimes.append(f"<tr><td><code>{model_type}</code></td><td><code>{rule}</code></td><td>{values}</td>"
                       f"<td>{inline_code(regime.source)}</td></tr>")
    return table + ('\n\n<div class="grape-fields grape-recommended"><table>\n<thead><tr><th>model type</th><th>rule</th>'
                    "<th>published regime</th><th>source</th></tr></thead>\n<tbody>\n" + "\n".join(regimes)
                    + "\n</tbody></table></div>")


def inline_code(text: str) -> str:
    """HTML-escape `text`, turning its `backtick` spans into <code>."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text, quote=False))


def rules_cell(rules: tuple[str, ...], every_rule: tuple[str, ...]) -> str:
    """The rules a field applies to; "every rule but bp" where it names them all."""
    if set(rules) == set(every_rule) - {"bp"}:
        return "every rule but <code>bp</code>"
    return ", ".join(f"<code>{rule}</code>" for rule in rules)


def fields_table() -> str:
    """An HTML table of the fields `GrapeTrainingArguments` adds (those whose metadata names their rules):
    the field with its type and default, the rules it applies to, its help text and valid values."""
    from transformers import TrainingArguments

    from grape_hf import GrapeTrainingArguments
    from grape_hf.arguments import DEPRECATED_NAMES, RULE_NAMES

    inherited = {f.name for f in dataclasses.fields(TrainingArguments)}
    rows = []
    for f in dataclasses.fields(GrapeTrainingArguments):
        if f.name in inherited or "help" not in f.metadata:
            continue
        rules = f.metadata["rules"]
        if not rules:
            continue  # the deprecated old names (no rules): listed under the table
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        choices = f.metadata["choices"] if "choices" in f.metadata else None
        values = f"<br>Values: {', '.join(f'<code>{c}</code>' for c in choices)}." if choices else ""
        rows.append(
            f'<tr><td><code>{f.name}</code><br><small><code>{html.escape(str(kind))}</code> = '
            f"<code>{html.escape(repr(default))}</code></small></td>"
            f"<td>{rules_cell(rules, RULE_NAMES)}</td><td>{inline_code(f.metadata['help'])}{values}</td></tr>"
        )
    if not rows:
        raise RuntimeError("GrapeTrainingArguments has no field with metadata['rules']: the hook needs updating")
    header = "<tr><th>field, type = default</th><th>rules</th><th>meaning</th></tr>"
    table = (f'<div class="grape-fields"><table>\n<thead>{header}</thead>\n<tbody>\n' + "\n".join(rows)
             + "\n</tbody></table></div>")
    old = ", ".join(f"<code>{old}</code> (now <code>{new}</code>)" for old, new in DEPRECATED_NAMES.items())
    return table + (f"\n\n<p>Old names still accepted in this release, with a <code>FutureWarning</code>: {old}.</p>"
                    if old else "")
