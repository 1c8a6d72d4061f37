"""What a digest says: each change it carries rendered with its own change type's template, inside the
template row `change_type = 'digest'` (or the built-in text, in Chinese with an English line).

A single held change goes as its own email (its own template, the mail it would have been at once, only
later); a digest of one says nothing more and reads worse.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import templates_repo
import wecom
from templates_repo import EmailTemplate, RenderError

DIGEST = "digest"
BUILT_IN = EmailTemplate(*templates_repo.DIGEST_ROW[1:])
RULE = "-" * 40
SEPARATOR = f"\n\n{RULE}\n\n"  # between two changes: a blank line, a rule, a blank line


@dataclass(frozen=True)
class Message:
    """A digest's subject and body, and what went wrong on the way (recorded, never fatal)."""
    subject: str
    body: str
    problem: str | None = None  # the digest template's, when the built-in text was used instead
    notes: dict[int, str] = field(default_factory=dict)  # event id → why its change is listed bare


@dataclass(frozen=True)
class Rendered:
    """One change as its own template renders it; `problem` when it had to be listed bare."""
    title: str
    body: str
    problem: str | None = None

    @property
    def text(self) -> str:
        return self.title if self.problem else f"{self.title}\n{self.body}"


class ChangeRenderer:
    """Renders each change once per flush with its own change type's template (many digests carry it)."""

    def __init__(self, settings, templates: dict[str, EmailTemplate], names: dict[str, str]):
        self.settings, self.templates, self.names = settings, templates, names
        self._done: dict[int, Rendered] = {}

    def __call__(self, change) -> Rendered:
        rendered = self._done.get(change.event_id)
        if rendered is None:
            rendered = self._done[change.event_id] = self._render(change)
        return rendered

    def _render(self, change) -> Rendered:
        settings = self.settings
        template = self.templates.get(change.change_type)
        if template is None:
            return self._bare(change, f"no template for change_type {change.change_type!r} "
                                      f"(app {settings.template_app!r} in {settings.template_table})")
        try:
            event = wecom.parse_event(change.xml)
            title, body = templates_repo.render_email(template, event, settings.tz,
                                                      self.names.get(change.user_id, ""))
        except RenderError as exc:
            return self._bare(change, f"template error: {exc}")
        except wecom.CallbackRejected as exc:
            return self._bare(change, f"stored event XML does not parse: {exc.reason}")
        return Rendered(title, body)

    def _bare(self, change, problem: str) -> Rendered:
        when = templates_repo.format_time(change.create_time, self.settings.tz)
        listed = " · ".join(part for part in (change.change_type, change.user_id, when) if part)
        return Rendered(listed, "", problem)


def compose(changes, render: ChangeRenderer, template: EmailTemplate | None, tz) -> Message:
    """The mail for one recipient's held `changes` (in CreateTime order)."""
    rendered = [render(change) for change in changes]
    notes = {change.event_id: f"listed in a digest by change type, userid and time: {r.problem}"
             for change, r in zip(changes, rendered) if r.problem}
    if len(rendered) == 1 and not rendered[0].problem:
        return Message(rendered[0].title, rendered[0].body)
    times = [c.create_time for c in changes if c.create_time is not None]
    values = {"count": str(len(changes)), "changes": SEPARATOR.join(r.text for r in rendered),
              "first_time": templates_repo.format_time(min(times), tz) if times else "",
              "last_time": templates_repo.format_time(max(times), tz) if times else ""}
    problem = None
    try:
        subject, body = _fill(template or BUILT_IN, values)
    except RenderError as exc:
        problem = f"digest template error, the built-in text was used: {exc}"
        subject, body = _fill(BUILT_IN, values)
    return Message(subject, body, problem, notes)


def _fill(template: EmailTemplate, values: dict[str, str]) -> tuple[str, str]:
    lines = templates_repo.render(template.title, values).splitlines()
    return " ".join(line.strip() for line in lines if line.strip()), templates_repo.render(template.body, values)
