"""nbgrader configuration for qkv (read by `nbgrader ...` run in the repo root, and by qkv.grading).

Layout: solutions/ holds the SOURCE notebooks, exercises/ the RELEASE notebooks (committed);
everything nbgrader writes while grading lives under _grading/ (git-ignored).

`python -m qkv.grading grade` does not grade in this tree: it grades every submission in its own
scratch course root, with this file as the base configuration (see lib/qkv/grading/worker.py).
"""

import os

import nbgrader

c = get_config()  # noqa: F821 (provided by traitlets when it loads this file)

root = os.path.dirname(os.path.abspath(__file__))
grading = os.path.join(root, "_grading")
os.makedirs(grading, exist_ok=True)  # nbgrader's error is misleading when the db folder is missing

c.CourseDirectory.root = root
c.CourseDirectory.course_id = "qkv"
c.CourseDirectory.source_directory = "solutions"
c.CourseDirectory.release_directory = "exercises"
c.CourseDirectory.submitted_directory = "_grading/submitted"
c.CourseDirectory.autograded_directory = "_grading/autograded"
c.CourseDirectory.feedback_directory = "_grading/feedback"
c.CourseDirectory.db_url = "sqlite:///" + os.path.join(grading, "gradebook.db")

# Per-cell time limit in seconds (QKV_CELL_TIMEOUT or `grade --timeout` override it). A cell that
# runs longer is interrupted; a kernel that ignores the interrupt makes the submission ungradable.
c.Execute.timeout = int(os.environ.get("QKV_CELL_TIMEOUT", "30"))
c.Execute.extra_arguments = ["--HistoryManager.hist_file=:memory:"]

# nbgrader gives a test cell zero if it writes anything to stderr. Drop a stderr output when it
# consists only of Python warning records ("file:12: SomeWarning: text" plus indented source
# lines), so a correct answer that triggers a NumPy/PyTorch warning keeps its points. Anything else
# on stderr still counts. (The pattern is linear: lines either start with a non-blank and contain
# "Warning: ", or start with a blank.)
c.IgnorePattern.enabled = True  # nbgrader ships it disabled
c.IgnorePattern.pattern = r"\A(?:(?:[^\s][^\n]*Warning: [^\n]*|[ \t][^\n]*)?(?:\n|\Z))+\Z"

# At most this many lines of printed output per cell survive into the graded notebook.
c.LimitOutput.max_lines = 1000
c.LimitOutput.max_traceback = 100

# Feedback never shows hidden tests (nbgrader's default feedback keeps them): HideHiddenTracebacks
# cuts a failing hidden test's traceback to its message, then ClearHiddenTests removes the code.
c.GenerateFeedback.preprocessors = [
    "nbgrader.preprocessors.GetGrades",
    "nbconvert.preprocessors.CSSHTMLHeaderPreprocessor",
    "qkv.grading.feedback.HideHiddenTracebacks",
    "nbgrader.preprocessors.ClearHiddenTests",
]
# A learner cell containing the hidden-test marker must not crash the feedback.
c.ClearHiddenTests.enforce_metadata = False

# Feedback renders math offline: templates/feedback/mathjax.html.j2 (searched before nbgrader's
# own feedback template) loads MathJax 3 from _grading/feedback/mathjax/, which `grade` copies
# there from the sphinx-mathjax-offline package. nbgrader's feedback template ignores
# HTMLExporter.mathjax_url; it is set for anything rendered with nbconvert's own templates.
c.HTMLExporter.extra_template_basedirs = [
    os.path.join(root, "lib", "qkv", "grading", "templates"),
    os.path.join(os.path.dirname(nbgrader.__file__), "server_extensions", "formgrader",
                 "templates"),
]
c.HTMLExporter.mathjax_url = "../../mathjax/tex-svg.js"

# Feedback pages show the learner's output: no live script or style in them (the grader sets it
# for its own runs too; this covers `nbgrader generate_feedback` run by hand).
c.HTMLExporter.sanitize_html = True
