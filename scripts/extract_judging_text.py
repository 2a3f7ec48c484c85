#!/usr/bin/env python3
"""Turns unpacked Debian localisation packages into plain "judging" text, one line a unit.

Called by scripts/fetch-judging-text.sh, which downloads and unpacks the packages and says
which is which; see that script for why this text exists and under which licence it comes.
Python 3 standard library only.

Two sources:

* libreoffice: LibreOffice help pages (usr/share/libreoffice/help/<lang>/text/**.html). The
  visible text of the page body (div#DisplayArea) is kept; the page chrome, <head>, <script>,
  <style>, code samples (<pre>, <code>, class bascode/code/codeintable/smathcode) and the
  platform variants that the help hides (hidden elements whose id does not start with
  "default") are skipped. Every block element (p, h1-h6, li, td, ...) and <br> ends a line.
* firefox: the .ftl and .properties files inside the Firefox language pack
  (usr/lib/firefox-esr/browser/extensions/langpack-*.xpi, a zip). Only message values and
  attribute values are kept: no ids, no comments, no terms (-brand-name = ...), no
  accesskeys/keys/style attributes. Fluent placeables are removed ({ $var }, { -term },
  { msg.attr }, { NUMBER(...) }), a select expression is replaced by its default variant, a
  string literal placeable ({ "x" }) by its text. In .properties values, %S/%1$S/%d/#1 style
  placeholders and HTML tags are removed and plural lists ("#1 tab;#1 tabs") reduced to the
  last form.

Every unit is then cleaned (see clean(): NFC, U+200B/U+2060/U+FEFF/U+00AD removed, whitespace
runs made one space) and kept only if it is text of the language (see LanguageFilter):
* at least MIN_SCRIPT_LETTERS letters of the language's script, and for Thai/Lao/Khmer/Burmese
  at least half of its letters;
* no control characters or U+FFFD (a few lines are mis-encoded in the packages);
* not a line of the English LibreOffice help (libreoffice-help-en-us): the help falls back to
  English paragraph by paragraph where a translation is missing;
* for the Latin-script languages (vi, id, ms, tl), not English: vi needs at least one
  Vietnamese letter; a line with more English than native function words goes, and so does
  one with no native function word whose words are all words of the English help (an
  untranslated label such as "Restart frame").
Exact duplicate lines are removed, keeping the first, and so are lines of the training text.
Order is deterministic (files sorted by path), so two runs over the same packages give
byte-identical files.

Commands:
  extract_judging_text.py build PLAN OUT_DIR [--exclude-dir DIR]
      PLAN is a TSV file, one package a line: lang, source, package, version, deb sha256,
      unpacked directory. source is "libreoffice" or "firefox", or "english" for the
      English LibreOffice help (libreoffice-help-en-us), read only to recognise English.
      A row with an empty version is a package Debian does not have; it is listed in the
      manifest as missing. Writes
      {lang}.{source}.txt for every package, {lang}.txt for every language (all its sources
      in PLAN order, a line already in an earlier source not repeated) and manifest.json.
      Lines found verbatim in DIR/{lang}.txt (the training text) are dropped.
  extract_judging_text.py is-current MANIFEST PLAN
      Exit status 0 when MANIFEST was built by this very extractor from the packages and
      versions in PLAN (its last two columns may be empty) and every text file still has
      the recorded SHA-256; 1 otherwise.
  extract_judging_text.py extract SOURCE LANG UNPACKED_DIR
      Prints the lines of one unpacked package to stdout, to look at (without the filters
      that need the English help or the training text).
"""

import hashlib
import html
import html.parser
import json
import os
import re
import sys
import unicodedata
import zipfile

MIN_SCRIPT_LETTERS = 3
# Share of a line's letters that must be in the language's script (non-Latin languages), so
# that an English sentence with one Khmer word in it does not count as Khmer.
MIN_SCRIPT_SHARE = 0.5

LICENCE = "MPL-2.0"

# Script ranges (letters and combining marks both count as "letters" of the script).
SCRIPTS = {
    "thai": [(0x0E00, 0x0E7F)],
    "lao": [(0x0E80, 0x0EFF)],
    "khmer": [(0x1780, 0x17FF), (0x19E0, 0x19FF)],
    "myanmar": [(0x1000, 0x109F), (0xA9E0, 0xA9FF), (0xAA60, 0xAA7F)],
    "latin": [(0x0041, 0x005A), (0x0061, 0x007A), (0x00C0, 0x024F), (0x1E00, 0x1EFF)],
}

# A few very frequent English function words, used to drop untranslated English paragraphs
# (LibreOffice help falls back to English for strings that were never translated) in the
# Latin-script languages. None of them is a word of vi/id/ms/tl.
ENGLISH_WORDS = frozenset(
    "the of and to is are be in that this for with you your it its on as by an or can from "
    "which not will if when these those has have was were there their then than into only "
    "also use used using click select enter choose".split()
)

# Function words of each Latin-script language: a line is English when it has more English
# than native function words.
NATIVE_WORDS = {
    "vi": "của và các là để trong có không được cho một với này những bạn khi từ sẽ thì đã "
    "hoặc nếu trên theo bằng vào ra người cũng nhấn chọn",
    "id": "yang dan di ke dari untuk dengan ini itu pada atau dalam tidak anda akan adalah "
    "dapat jika oleh ada juga bisa sebagai harus lebih telah sudah kami saat agar tersebut "
    "klik pilih",
    "ms": "yang dan di ke dari untuk dengan ini itu pada atau dalam tidak anda akan adalah "
    "boleh jika oleh ada juga sebagai perlu lebih telah sudah kami apabila tersebut bagi "
    "klik pilih",
    "tl": "ang ng mga sa na at ay para hindi ito mo ko kung o upang iyong nang ka may lang "
    "mula ay ang iyong i-click piliin",
}

LANG_SCRIPT = {
    "th": "thai",
    "lo": "lao",
    "km": "khmer",
    "my": "myanmar",
    "vi": "latin",
    "id": "latin",
    "ms": "latin",
    "tl": "latin",
}

# Vietnamese letters that ASCII lacks: a Vietnamese sentence has some, an English one none.
VI_LETTERS = frozenset(
    unicodedata.normalize(
        "NFC",
        "ăâđêôơưàằầèềìòồờùừỳáắấéếíóốớúứýảẳẩẻểỉỏổởủửỷãẵẫẽễĩõỗỡũữỹạặậẹệịọộợụựỵ",
    )
)
VI_LETTERS = VI_LETTERS | frozenset(c.upper() for c in VI_LETTERS)

WORD_RE = re.compile(r"[^\W\d_]+(?:[-'][^\W\d_]+)*")

# Invisible characters removed outright. U+200B (zero-width space) is how Khmer help marks
# word boundaries; the training text (UDHR) has none, so it would only add unseen tokens.
INVISIBLE = dict.fromkeys(map(ord, "\u200b\u2060\ufeff\u00ad"), None)


def in_ranges(ch, ranges):
    o = ord(ch)
    return any(lo <= o <= hi for lo, hi in ranges)


class English:
    """What English looks like, learnt from the English LibreOffice help (libreoffice-help-en-us).

    lines: its lines; a translated line equal to one of them was never translated.
    words: the words it uses at least twice, lower-cased.
    """

    def __init__(self, lines=()):
        lines = list(lines)
        counts = {}
        for line in lines:
            for w in WORD_RE.findall(line):
                w = w.lower()
                counts[w] = counts.get(w, 0) + 1
        self.lines = frozenset(lines)
        self.words = frozenset(w for w, n in counts.items() if n >= 2)


class LanguageFilter:
    """Says why a line is not text of the language, or None when it is."""

    def __init__(self, lang, english=English()):
        if lang not in LANG_SCRIPT:
            raise SystemExit(f"extract_judging_text: unknown language {lang!r}")
        self.lang = lang
        self.script = LANG_SCRIPT[lang]
        self.ranges = SCRIPTS[self.script]
        self.english = english
        native = NATIVE_WORDS.get(lang, "")
        self.native = frozenset(unicodedata.normalize("NFC", native).split())

    def reject(self, line):
        if line in self.english.lines:
            return "english_original"
        # Control characters and U+FFFD: text broken in the package (a few Khmer help lines
        # carry C1 controls, mis-encoded twice).
        if any(c == "\ufffd" or unicodedata.category(c) == "Cc" for c in line):
            return "broken_encoding"
        letters = [c for c in line if unicodedata.category(c)[0] in "LM"]
        in_script = sum(1 for c in letters if in_ranges(c, self.ranges))
        if in_script < MIN_SCRIPT_LETTERS:
            return "not_language"
        if self.script != "latin":
            return None if in_script >= MIN_SCRIPT_SHARE * len(letters) else "not_language"
        if self.lang == "vi" and not any(c in VI_LETTERS for c in line):
            return "not_language"
        words = [w.lower() for w in WORD_RE.findall(line)]
        native = sum(1 for w in words if w in self.native)
        if sum(1 for w in words if w in ENGLISH_WORDS) > native:
            return "english"
        # Untranslated UI labels ("Delete", "Restart frame") have no function words at all.
        if native == 0 and self.english.words and all(w in self.english.words for w in words):
            return "english"
        return None


def clean(text):
    """NFC, invisible characters removed, all whitespace runs made one space."""
    text = unicodedata.normalize("NFC", text).translate(INVISIBLE)
    return " ".join(text.split())


# ---------------------------------------------------------------------------------------
# LibreOffice help (HTML)

BLOCK_TAGS = frozenset(
    "p div h1 h2 h3 h4 h5 h6 li ul ol dl dt dd table tr td th thead tbody tfoot caption "
    "section article header footer nav aside blockquote figure figcaption form fieldset "
    "legend label button details summary main center".split()
)
VOID_TAGS = frozenset(
    "area base br col embed hr img input link meta param source track wbr".split()
)
SKIP_TAGS = frozenset("script style pre code noscript head title template svg math".split())
SKIP_CLASSES = frozenset("bascode code codeintable smathcode debug".split())
# Elements after which the help page has no more content.
END_IDS = frozenset(["SearchFrame", "DonationFrame"])


class HelpPageParser(html.parser.HTMLParser):
    """Collects the visible text of div#DisplayArea, one block a unit."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.units = []
        self.buf = []
        self.capturing = False
        self.done = False
        self.stack = []  # [tag, skip]
        self.skip_depth = 0  # how many entries of stack have skip set

    def flush(self):
        if self.buf:
            self.units.append("".join(self.buf))
            self.buf = []

    def handle_starttag(self, tag, attrs):
        if self.done:
            return
        a = dict(attrs)
        if not self.capturing:
            if tag == "div" and a.get("id") == "DisplayArea":
                self.capturing = True
            return
        if tag == "footer" or a.get("id") in END_IDS:
            self.flush()
            self.done = True
            return
        if tag in BLOCK_TAGS or tag == "br":
            self.flush()
        if tag in VOID_TAGS:
            return
        classes = set((a.get("class") or "").split())
        skip = (
            tag in SKIP_TAGS
            or bool(classes & SKIP_CLASSES)
            or ("hidden" in a and not (a.get("id") or "").startswith("default"))
        )
        self.stack.append([tag, skip])
        self.skip_depth += skip

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if self.capturing and not self.done and tag not in VOID_TAGS:
            self.handle_endtag(tag)

    def handle_endtag(self, tag):
        if not self.capturing or self.done:
            return
        if tag in BLOCK_TAGS:
            self.flush()
        # Pop to the matching open tag; a stray end tag with no match is ignored.
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i][0] == tag:
                for _, skip in self.stack[i:]:
                    self.skip_depth -= skip
                del self.stack[i:]
                break

    def handle_data(self, data):
        if self.capturing and not self.done and self.skip_depth == 0:
            self.buf.append(data)

    def close(self):
        super().close()
        self.flush()


def libreoffice_units(root, lang):
    base = os.path.join(root, "usr", "share", "libreoffice", "help", lang, "text")
    if not os.path.isdir(base):
        raise SystemExit(f"extract_judging_text: no LibreOffice help pages under {base}")
    paths = []
    for d, dirs, files in os.walk(base):
        dirs.sort()
        paths.extend(os.path.join(d, f) for f in files if f.endswith(".html"))
    for path in sorted(paths):
        with open(path, encoding="utf-8", errors="replace") as f:
            parser = HelpPageParser()
            parser.feed(f.read())
            parser.close()
        yield from parser.units


# ---------------------------------------------------------------------------------------
# Firefox language packs (.ftl, .properties in a zip)

TAG_RE = re.compile(r"</?([A-Za-z%][\w:.-]*)[^<>]*>")
BREAK_TAGS = frozenset("br p div li ul ol h1 h2 h3 h4 h5 h6 tr td th table".split())


def strip_tags(s):
    """HTML tags removed; a tag that breaks the line leaves a space, an inline one nothing."""
    return TAG_RE.sub(lambda m: " " if m.group(1).lower() in BREAK_TAGS else "", s)
PROPS_PLACEHOLDER_RE = re.compile(
    r"%%|%(?:\d+\$)?[-+0#]*\d*(?:\.\d+)?(?:ll|l|h)?[SsDdIiUuFfXxEeGgCc@]|#\d+|\$[A-Z_]+\$?"
)
# Where a placeholder or placeable was removed. Afterwards, brackets and quotes left empty
# ("( )", "“ ”") go with it, and so does the space before following punctuation.
HOLE = "\x00"
EMPTY_PAIR_RE = re.compile(
    r"""\(\s*\x00[\s\x00]*\)|\[\s*\x00[\s\x00]*\]|"\s*\x00[\s\x00]*"|'\s*\x00[\s\x00]*'"""
    r"|“\s*\x00[\s\x00]*”|‘\s*\x00[\s\x00]*’|«\s*\x00[\s\x00]*»|„\s*\x00[\s\x00]*“|<\s*\x00[\s\x00]*>"
)
HOLE_BEFORE_PUNCT_RE = re.compile(r"[\s\x00]*\x00[\s\x00]*(?=[.,:;!?…])")
HOLE_RE = re.compile(r"[\s\x00]*\x00[\s\x00]*")


def fill_holes(s):
    while True:
        t = EMPTY_PAIR_RE.sub(HOLE, s)
        if t == s:
            break
        s = t
    return HOLE_RE.sub(" ", HOLE_BEFORE_PUNCT_RE.sub("", s))


SKIP_NAME_PARTS = frozenset("accesskey key keys commandkey keycode style width height".split())
FTL_ENTRY_RE = re.compile(r"(-?)([A-Za-z][\w-]*)[ \t]*=(.*)")
FTL_ATTR_RE = re.compile(r"[ \t]+\.([A-Za-z][\w-]*)[ \t]*=(.*)")


def skip_name(name):
    last = re.split(r"[-._]", name.lower())[-1]
    return last in SKIP_NAME_PARTS or last.endswith("accesskey") or name.lower().startswith(
        "devtools-commandkey"
    )


def ftl_depth_change(line, depth):
    """Brace depth after LINE, starting at DEPTH; string literals are only inside braces."""
    i = 0
    while i < len(line):
        c = line[i]
        if c == "{":
            depth += 1
        elif c == "}":
            depth = max(0, depth - 1)
        elif c == '"' and depth > 0:
            i += 1
            while i < len(line) and line[i] != '"':
                i += 2 if line[i] == "\\" else 1
        i += 1
    return depth


def ftl_match_brace(s, i):
    """Index just past the '}' matching the '{' at s[i]."""
    depth = 0
    while i < len(s):
        c = s[i]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i + 1
        elif c == '"' and depth > 0:
            i += 1
            while i < len(s) and s[i] != '"':
                i += 2 if s[i] == "\\" else 1
        i += 1
    return len(s)


def ftl_unescape_literal(s):
    return re.sub(
        r"\\(u[0-9a-fA-F]{4}|U[0-9a-fA-F]{6}|.)",
        lambda m: chr(int(m.group(1)[1:], 16)) if len(m.group(1)) > 1 else m.group(1),
        s,
    )


def ftl_default_variant(body):
    """The pattern of the *[default] variant of a select expression's variant list."""
    keys = []  # (start of key, end of key, is default)
    depth = 0
    i = 0
    at_line_start = True
    while i < len(body):
        c = body[i]
        if c == "\n":
            at_line_start = True
        elif at_line_start and c in " \t":
            pass
        elif at_line_start and depth == 0 and (c == "[" or body.startswith("*[", i)):
            end = body.find("]", i)
            if end < 0:
                break
            keys.append((i, end + 1, c == "*"))
            i = end + 1
            at_line_start = False
            continue
        else:
            at_line_start = False
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
            elif c == '"' and depth > 0:
                i += 1
                while i < len(body) and body[i] != '"':
                    i += 2 if body[i] == "\\" else 1
        i += 1
    for n, (_, end, default) in enumerate(keys):
        if default:
            stop = keys[n + 1][0] if n + 1 < len(keys) else len(body)
            return body[end:stop]
    return ""


def ftl_pattern_text(s):
    """Text of a Fluent pattern with placeables removed (select: default variant)."""
    out = []
    i = 0
    while i < len(s):
        j = s.find("{", i)
        if j < 0:
            out.append(s[i:])
            break
        out.append(s[i:j])
        k = ftl_match_brace(s, j)
        inner = s[j + 1 : k - 1].strip()
        m = re.fullmatch(r'"((?:[^"\\]|\\.)*)"', inner)
        if m:
            out.append(ftl_unescape_literal(m.group(1)))
        else:
            arrow = re.search(r"->", inner)
            if arrow and ftl_depth_change(inner[: arrow.start()], 0) == 0:
                out.append(ftl_pattern_text(ftl_default_variant(inner[arrow.end() :])))
            else:
                out.append(HOLE)
        i = k
    return "".join(out)


def ftl_values(text):
    """Message and attribute values of a Fluent file, as raw patterns."""
    lines = text.replace("\r\n", "\n").split("\n")
    entries = []  # [skip_entry, [[name, [pattern lines]], ...]]
    cur = None
    for line in lines:
        if cur is not None and (line.startswith((" ", "\t")) or not line.strip()):
            attr = FTL_ATTR_RE.fullmatch(line) if cur[2] == 0 else None
            if attr:
                cur[1].append([attr.group(1), [attr.group(2)]])
                cur[2] = ftl_depth_change(attr.group(2), 0)
            else:
                cur[1][-1][1].append(line)
                cur[2] = ftl_depth_change(line, cur[2])
            continue
        cur = None
        m = FTL_ENTRY_RE.fullmatch(line)
        if m:
            is_term = m.group(1) == "-"
            cur = [is_term, [[m.group(2), [m.group(3)]]], ftl_depth_change(m.group(3), 0)]
            entries.append(cur)
        # Anything else at column 0 (comments, junk) ends the entry and is dropped.
    for is_term, parts, _ in entries:
        if is_term:
            continue
        for name, plines in parts:
            if skip_name(name):
                continue
            yield "\n".join(plines)


def properties_values(text):
    """Values of a Java-style .properties file (escapes resolved)."""
    logical = []
    acc = ""
    for raw in text.replace("\r\n", "\n").split("\n"):
        line = raw.lstrip() if acc else raw
        if not acc and line.lstrip().startswith(("#", "!")):
            continue
        trailing = len(line) - len(line.rstrip("\\"))
        if trailing % 2 == 1:
            acc += line[:-1]
            continue
        logical.append(acc + line)
        acc = ""
    if acc:
        logical.append(acc)
    for line in logical:
        line = line.lstrip()
        if not line:
            continue
        m = re.match(r"((?:[^\\=:\s]|\\.)*)\s*[=:\s]\s*(.*)", line, re.S)
        if not m:
            continue
        key, value = m.group(1), m.group(2)
        if skip_name(key):
            continue
        value = re.sub(
            r"\\(u[0-9a-fA-F]{4}|.)",
            lambda m: chr(int(m.group(1)[1:], 16))
            if len(m.group(1)) > 1
            else {"n": "\n", "t": "\t", "r": "\r", "f": "\f"}.get(m.group(1), m.group(1)),
            value,
        )
        yield value


def props_placeholder(m):
    return "%" if m.group(0) == "%%" else HOLE


def strip_markup(s):
    return html.unescape(strip_tags(s))


def firefox_units(root, lang):
    ext_dir = os.path.join(root, "usr", "lib", "firefox-esr", "browser", "extensions")
    xpis = sorted(
        os.path.join(ext_dir, f)
        for f in (os.listdir(ext_dir) if os.path.isdir(ext_dir) else [])
        if f.startswith("langpack-") and f.endswith(".xpi")
    )
    if not xpis:
        raise SystemExit(f"extract_judging_text: no langpack-*.xpi under {ext_dir}")
    for xpi in xpis:
        with zipfile.ZipFile(xpi) as z:
            for name in sorted(z.namelist()):
                if name.endswith(".ftl"):
                    text = z.read(name).decode("utf-8", errors="replace")
                    for pattern in ftl_values(text):
                        yield fill_holes(strip_markup(ftl_pattern_text(pattern)))
                elif name.endswith(".properties"):
                    text = z.read(name).decode("utf-8", errors="replace")
                    for value in properties_values(text):
                        if "#1" in value and ";" in value:
                            value = value.split(";")[-1]
                        value = strip_tags(value)
                        value = PROPS_PLACEHOLDER_RE.sub(props_placeholder, value)
                        yield fill_holes(html.unescape(value))


SOURCES = {"libreoffice": libreoffice_units, "firefox": firefox_units}
# The English LibreOffice help, read only to recognise English (see English).
ENGLISH_SOURCE = "english"


def english_from(root):
    return English(filter(None, (clean(u) for u in libreoffice_units(root, "en-US"))))


def extract(source, lang, root, training=frozenset(), english=English()):
    """Cleaned, filtered, de-duplicated lines of one unpacked package, and counts."""
    reject = LanguageFilter(lang, english).reject
    seen = set()
    lines = []
    stats = dict.fromkeys(
        [
            "units",
            "dropped_duplicate",
            "dropped_broken_encoding",
            "dropped_not_language",
            "dropped_english_original",
            "dropped_english",
            "dropped_in_training",
        ],
        0,
    )
    for unit in SOURCES[source](root, lang):
        line = clean(unit)
        if not line:
            continue
        stats["units"] += 1
        if line in seen:
            stats["dropped_duplicate"] += 1
            continue
        seen.add(line)
        why = reject(line)
        if why:
            stats["dropped_" + why] += 1
        elif line in training:
            stats["dropped_in_training"] += 1
        else:
            lines.append(line)
    return lines, stats


# ---------------------------------------------------------------------------------------
# build / is-current


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_plan(path):
    rows = []
    with open(path, encoding="utf-8") as f:
        for raw in f:
            raw = raw.rstrip("\n")
            if not raw:
                continue
            cols = raw.split("\t")
            cols += [""] * (6 - len(cols))
            lang, source, package, version, sha, root = cols[:6]
            if source not in SOURCES and source != ENGLISH_SOURCE:
                raise SystemExit(f"extract_judging_text: unknown source {source!r} in {path}")
            rows.append(
                dict(lang=lang, source=source, package=package, version=version, sha256=sha, root=root)
            )
    return rows


def text_stats(path, lines):
    return {
        "file": os.path.basename(path),
        "lines": len(lines),
        "chars": sum(len(l) for l in lines),
        "bytes": os.path.getsize(path),
        "sha256": sha256_file(path),
    }


def write_lines(path, lines):
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for line in lines:
            f.write(line + "\n")


def package_record(row):
    return {"package": row["package"], "version": row["version"], "deb_sha256": row["sha256"]}


def report(rec):
    print(
        f"extract_judging_text: {rec['file']}: {rec['lines']} lines, {rec['chars']} characters",
        file=sys.stderr,
    )


def build(plan_path, out_dir, exclude_dir=None):
    rows = read_plan(plan_path)
    os.makedirs(out_dir, exist_ok=True)
    references = {}
    english = English()
    for row in rows:
        if row["source"] == ENGLISH_SOURCE and row["version"]:
            english = english_from(row["root"])
            references[ENGLISH_SOURCE] = {
                **package_record(row),
                "licence": LICENCE,
                "lines": len(english.lines),
                "words": len(english.words),
            }
    languages = {}
    missing = [r for r in rows if not r["version"]]
    rows = [r for r in rows if r["version"]]
    for row in rows:
        if row["source"] == ENGLISH_SOURCE:
            continue
        lang = row["lang"]
        entry = languages.setdefault(lang, {"sources": {}, "_lines": []})
        training = frozenset()
        if exclude_dir:
            train = os.path.join(exclude_dir, f"{lang}.txt")
            if os.path.exists(train):
                with open(train, encoding="utf-8") as f:
                    training = frozenset(clean(l) for l in f)
        lines, stats = extract(row["source"], lang, row["root"], training, english)
        path = os.path.join(out_dir, f"{lang}.{row['source']}.txt")
        write_lines(path, lines)
        rec = {**package_record(row), "licence": LICENCE, **text_stats(path, lines)}
        rec["extraction"] = stats
        entry["sources"][row["source"]] = rec
        entry["_lines"].append(lines)
        report(rec)
    for lang, entry in languages.items():
        seen = set()
        merged = []
        for lines in entry.pop("_lines"):
            for line in lines:
                if line not in seen:
                    seen.add(line)
                    merged.append(line)
        path = os.path.join(out_dir, f"{lang}.txt")
        write_lines(path, merged)
        entry.update(text_stats(path, merged))
        entry["licence"] = LICENCE
        report(entry)
    manifest = {
        "description": "Judging text for Mekong: localisation text from Debian packages, never "
        "used for training. {lang}.{source}.txt holds one package's text, {lang}.txt all "
        "sources of the language (LibreOffice help first, then Firefox; a line already in an "
        "earlier source is not repeated). UTF-8, NFC, one paragraph or message a line, exact "
        "duplicates removed. Written by scripts/fetch-judging-text.sh.",
        "licence": LICENCE,
        "extractor_sha256": sha256_file(os.path.abspath(__file__)),
        "filter": {
            "min_script_letters": MIN_SCRIPT_LETTERS,
            "min_script_share_non_latin": MIN_SCRIPT_SHARE,
            "latin_script_languages": "vi needs a Vietnamese letter; dropped as English: a line "
            "with more English than native function words, or with no native function word and "
            "only words the English LibreOffice help uses at least twice",
            "english_originals_dropped": ENGLISH_SOURCE in references,
            "training_lines_dropped": "data/udhr/{lang}.txt" if exclude_dir else None,
            "invisible_characters_removed": ["U+200B", "U+2060", "U+FEFF", "U+00AD"],
        },
        "references": references,
        "languages": dict(sorted(languages.items())),
        "missing_packages": [r["package"] for r in missing],
        "languages_without_text": sorted({r["lang"] for r in missing} - set(languages)),
    }
    with open(os.path.join(out_dir, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, ensure_ascii=False, indent=2)
        f.write("\n")


def is_current(manifest_path, plan_path):
    try:
        with open(manifest_path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return False
    if manifest.get("extractor_sha256") != sha256_file(os.path.abspath(__file__)):
        return False
    langs = manifest.get("languages", {})
    rows = [r for r in read_plan(plan_path) if r["version"]]
    want = {
        (r["lang"], r["source"]): (r["package"], r["version"]) for r in rows if r["source"] != ENGLISH_SOURCE
    }
    have = {
        (lang, src): (s.get("package"), s.get("version"))
        for lang, e in langs.items()
        for src, s in e.get("sources", {}).items()
    }
    want_refs = {r["source"]: (r["package"], r["version"]) for r in rows if r["source"] == ENGLISH_SOURCE}
    refs = manifest.get("references", {})
    have_refs = {k: (r.get("package"), r.get("version")) for k, r in refs.items()}
    if want != have or want_refs != have_refs:
        return False
    out_dir = os.path.dirname(os.path.abspath(manifest_path))
    for e in langs.values():
        for rec in [e, *e.get("sources", {}).values()]:
            path = os.path.join(out_dir, rec.get("file", ""))
            if not os.path.isfile(path) or sha256_file(path) != rec.get("sha256"):
                return False
    return True


def main(argv):
    if len(argv) >= 3 and argv[0] == "build":
        exclude = None
        rest = argv[3:]
        if rest[:1] == ["--exclude-dir"] and len(rest) == 2:
            exclude = rest[1]
        elif rest:
            raise SystemExit(__doc__)
        build(argv[1], argv[2], exclude)
        return 0
    if len(argv) == 3 and argv[0] == "is-current":
        return 0 if is_current(argv[1], argv[2]) else 1
    if len(argv) == 4 and argv[0] == "extract" and argv[1] in SOURCES:
        lines, stats = extract(argv[1], argv[2], argv[3])
        for line in lines:
            sys.stdout.write(line + "\n")
        print(json.dumps(stats), file=sys.stderr)
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
