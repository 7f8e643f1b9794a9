"""The third-party internals the framework relies on exist in the installed (pinned) versions."""

from framework import compat


def test_every_internal_we_rely_on_exists_in_the_pinned_versions():
    assert compat.missing() == []


def test_a_missing_internal_is_named_with_its_package_version_and_the_fix(monkeypatch):
    monkeypatch.setattr(compat, "INTERNALS", [("lightning", "lightning.pytorch.cli:LightningCLI._gone", "why")])
    problems = compat.missing()
    assert len(problems) == 1 and problems[0].startswith("lightning 2.") and "LightningCLI._gone (why)" in problems[0]
