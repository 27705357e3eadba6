"""Small fixes to the HTML that Sphinx 7.4 and the book theme write.

Sphinx 7.4 writes some inline scripts twice (sphinx-thebe's `const THEBE_JS_URL = ...`), and the
second `const` is a console error on every page. Keep the first copy of each script.
"""


def _drop_repeated_scripts(app, pagename, templatename, context, doctree):
    scripts = context.get("script_files")
    if not scripts:
        return
    seen, unique = set(), []
    for js in scripts:
        key = (getattr(js, "filename", None) or "", getattr(js, "priority", None),
               tuple(sorted(getattr(js, "attributes", {}).items())))
        if key not in seen:
            seen.add(key)
            unique.append(js)
    scripts[:] = unique


def setup(app):
    app.connect("html-page-context", _drop_repeated_scripts, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
