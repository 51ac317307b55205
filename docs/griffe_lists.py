"""A griffe extension of the API reference (mkdocs.yml: mkdocstrings' `extensions`).

The package's docstrings start bullet lists right after a sentence ("... grouped by owner:\\n- first"), as
plain text reads well; Markdown needs a blank line there, or the list runs into the paragraph. This adds
that blank line when the reference renders a docstring; the docstrings themselves stay as they are.
"""

import griffe


def separate_lists(text: str) -> str:
    """`text` with a blank line before every list that follows a paragraph line directly."""
    lines = text.split("\n")
    out = []
    for line in lines:
        previous = out[-1] if out else ""
        starts_list = line.lstrip().startswith("- ") and not line.startswith(" ")
        in_paragraph = previous.strip() and not previous.startswith((" ", "-"))
        if starts_list and in_paragraph:
            out.append("")
        out.append(line)
    return "\n".join(out)


class ListsAfterParagraphs(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = separate_lists(obj.docstring.value)
