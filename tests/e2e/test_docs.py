"""The README stands on its own: no link or path outside the repository, every README section
that code, launch scripts or tools name exists, every make target it shows exists, and it says
how to install (from a clone, and what a wheel leaves out)."""
import re

from tests.conftest import ROOT

README = (ROOT / "README.md").read_text()
HEADINGS = {line.lstrip("#").strip() for line in README.splitlines() if line.startswith("#")}
# README "Section", README, "Section", README: 'Section' (quotes of either kind, across comment lines)
REFERENCE = re.compile(r"README[,:]?\s+(?:section\s+)?[\"'\u201c]([^\"'\u201d]+)[\"'\u201d]")


def _sources():
    for d in ("megarnn", "kernels", "launch", "tools", "examples", ".ci"):
        for p in sorted((ROOT / d).rglob("*")):
            if p.is_file() and p.suffix in ("", ".py", ".sh", ".sbatch", ".yaml"):
                yield p
    yield ROOT / "Makefile"


def test_readme_does_not_point_outside_the_repository():
    assert "../" not in README, [x for x in README.splitlines() if "../" in x]
    assert not re.search(r"(?<![\w.])/(work|home|root|tmp)/", README)
    for link in re.findall(r"\]\(([^)]+)\)", README):  # markdown links: in the repository or on the web
        assert link.startswith(("http://", "https://", "#")) or (ROOT / link).exists(), link


def test_every_readme_section_named_elsewhere_exists():
    named = {}
    for p in _sources():
        try:
            text = p.read_text()
        except UnicodeDecodeError:
            continue
        flat = re.sub(r"\s*\n\s*(#\s*)?", " ", text)  # a reference may wrap onto the next comment line
        for title in REFERENCE.findall(flat):
            named.setdefault(title.strip(), []).append(str(p.relative_to(ROOT)))
    assert "Preemption, hangs and resume" in named and "Your own cell" in named, named  # the pattern works
    missing = {t: where for t, where in named.items() if t not in HEADINGS}
    assert not missing, f"README sections named but absent: {missing}"


def test_make_targets_shown_exist():
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([\w-]+):", makefile, re.M))
    shown = set(re.findall(r"^make ([\w-]+)", README, re.M))
    assert {"install", "quickstart", "test"} <= shown and shown <= targets, (shown, targets)


def test_install_section_says_what_a_wheel_leaves_out():
    section = README.split("## Installing", 1)[1].split("\n## ", 1)[0]
    assert "git clone" in section and "make install" in section
    for left_out in ("configs/", "launch/", "tools/"):
        assert left_out in section.split("A wheel", 1)[1], left_out


def test_preemption_watchdog_and_resume_are_documented():
    section = README.split("### Preemption, hangs and resume", 1)[1].split("\n### ", 1)[0]
    for word in ("train.hang_timeout", "watchdog", "75", "requeue", "train.resume=auto", "train.save_interval"):
        assert word in section, word
