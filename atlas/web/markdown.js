// Atlas web chat: Markdown in replies, rendered safely and offline.
//
// Replies come from a model and are untrusted. This file parses a subset of Markdown and builds
// the result with createElement, createTextNode and textContent only: no text of a reply is ever
// parsed as HTML, so HTML in a reply is shown as the text it is. Links are made only for
// absolute http:, https: and mailto: URLs, and open in a new tab without access to this page.
//
//   blocks  paragraphs (a single newline is a line break), # headings, ``` and ~~~ fenced code,
//           - * + and 1. 1) lists (nested by indentation), > quotes, --- rules, | tables |
//   inline  `code`, **strong** __strong__, *em* _em_, ~~strike~~, [text](url), <url>,
//           bare http(s) URLs, backslash escapes
//
// Text that is half streamed renders as it stands: an unclosed fence is code to the end, an
// unclosed ** or ` is shown as typed until its closer arrives.
//
//   AtlasMarkdown.render(text)           -> DocumentFragment
//   AtlasMarkdown.renderInto(node, text)    replaces node's children
"use strict";

window.AtlasMarkdown = (() => {
  const MAX_DEPTH = 16;          // nesting of quotes, lists, inline spans and a URL's parentheses
  const MAX_URL = 2048;          // characters searched for a link's destination
  const SAFE_PROTOCOLS = new Set(["http:", "https:", "mailto:"]);
  const PUNCTUATION = /^[!-/:-@[-`{-~]$/;    // ASCII punctuation: what a backslash escapes
  const WORD = /[\p{L}\p{N}]/u;
  const SPACE = /\s/;

  const FENCE = /^( {0,3})(`{3,}|~{3,})(.*)$/;
  const HEADING = /^ {0,3}(#{1,6})(?:[ \t]+|$)/;
  const RULE = /^ {0,3}([-*_])(?:[ \t]*\1){2,}[ \t]*$/;
  const QUOTE = /^ {0,3}> ?(.*)$/;
  const ITEM = /^([ \t]*)(?:([-*+])|(\d{1,9})([.)]))(?:([ \t]+)(.*))?$/;
  const TABLE_DELIMITER = /^[ \t]*\|?[ \t]*:?-+:?[ \t]*(?:\|[ \t]*:?-+:?[ \t]*)*\|?[ \t]*$/;
  const CODE_LANGUAGE = /^[\w+#.-]{1,32}$/;
  const ANGLE_LINK = /^<([a-zA-Z][a-zA-Z0-9+.-]{1,31}:[^\s<>]*|[^\s@<>]+@[^\s@<>.]+(?:\.[^\s@<>.]+)+)>/;
  const BARE_URL = /^https?:\/\/[^\s<>]+/i;

  // -- helpers -------------------------------------------------------------------------------

  function el(tag, parent, text) {
    const node = document.createElement(tag);
    if (text !== undefined) node.textContent = text;
    if (parent) parent.appendChild(node);
    return node;
  }

  const isBlank = (line) => !/\S/.test(line);

  function indentOf(line) {
    let width = 0;
    for (const c of line) {
      if (c === " ") width += 1;
      else if (c === "\t") width += 4 - (width % 4);
      else break;
    }
    return width;
  }

  function stripIndent(line, width) {
    let taken = 0;
    let i = 0;
    while (i < line.length && taken < width && (line[i] === " " || line[i] === "\t")) {
      taken += line[i] === "\t" ? 4 - (taken % 4) : 1;
      i += 1;
    }
    return line.slice(i);
  }

  /** The href for a link to ``raw``, or null when it must not be a link. Only absolute URLs
   *  whose scheme, as the browser itself parses it, is http, https or mailto. */
  function safeHref(raw) {
    if (!raw || raw.length > MAX_URL) return null;
    let url;
    try {
      url = new URL(raw);
    } catch (err) {
      return null;   // relative, protocol-relative or malformed: not a link
    }
    return SAFE_PROTOCOLS.has(url.protocol) ? url.href : null;
  }

  function anchor(parent, href) {
    const a = el("a", parent);
    a.href = href;
    a.target = "_blank";
    a.rel = "noopener noreferrer";
    return a;
  }

  // -- blocks --------------------------------------------------------------------------------

  function openFence(line) {
    const m = FENCE.exec(line);
    if (!m || (m[2][0] === "`" && m[3].includes("`"))) return null;
    return { indent: m[1].length, fence: m[2], language: m[3].trim().split(/\s+/)[0] };
  }

  function heading(line) {
    const m = HEADING.exec(line);
    if (!m) return null;
    let text = line.slice(m[0].length).trimEnd();
    let end = text.length;
    while (end > 0 && text[end - 1] === "#") end -= 1;   // an optional closing run of #
    const bare = text.slice(0, end);
    if (bare === "" || bare.endsWith(" ") || bare.endsWith("\t")) text = bare.trimEnd();
    return { level: m[1].length, text };
  }

  function listItem(line) {
    const m = ITEM.exec(line);
    if (!m) return null;
    const indent = indentOf(m[1]);
    const marker = m[2] || m[3] + m[4];
    const gap = m[5] ? indentOf(m[5]) : 1;
    return {
      indent,
      ordered: !m[2],
      start: m[3] ? parseInt(m[3], 10) : 1,
      offset: indent + marker.length + (gap > 4 ? 1 : gap),
      text: m[6] || "",
    };
  }

  function splitCells(line) {
    let text = line.trim();
    if (text.startsWith("|")) text = text.slice(1);
    if (text.endsWith("|") && !text.endsWith("\\|")) text = text.slice(0, -1);
    const cells = [];
    let cell = "";
    for (let i = 0; i < text.length; i += 1) {
      if (text[i] === "\\" && text[i + 1] === "|") { cell += "|"; i += 1; }
      else if (text[i] === "|") { cells.push(cell.trim()); cell = ""; }
      else cell += text[i];
    }
    cells.push(cell.trim());
    return cells;
  }

  function tableAt(lines, i) {
    const header = lines[i];
    const delimiter = lines[i + 1];
    if (!header.includes("|") || delimiter === undefined || !delimiter.includes("|")) return null;
    if (!TABLE_DELIMITER.test(delimiter)) return null;
    const head = splitCells(header);
    const align = splitCells(delimiter).map((cell) => {
      const left = cell.startsWith(":");
      const right = cell.endsWith(":");
      return left && right ? "center" : right ? "right" : left ? "left" : "";
    });
    return head.length === align.length ? { head, align } : null;
  }

  function startsBlock(lines, i) {
    const line = lines[i];
    return Boolean(openFence(line) || HEADING.test(line) || RULE.test(line) || QUOTE.test(line)
      || listItem(line) || tableAt(lines, i));
  }

  function interruptsParagraph(lines, i) {
    const item = listItem(lines[i]);
    if (item) return item.indent <= 3 && item.text !== "" && (!item.ordered || item.start === 1);
    return startsBlock(lines, i);
  }

  function parseBlocks(lines, depth) {
    const blocks = [];
    let i = 0;
    while (i < lines.length) {
      const line = lines[i];
      let m;
      let item;
      if (isBlank(line)) {
        i += 1;
      } else if ((m = openFence(line))) {
        i = fencedCode(lines, i, m, blocks);
      } else if ((m = heading(line))) {
        blocks.push({ type: "heading", ...m });
        i += 1;
      } else if (RULE.test(line)) {
        blocks.push({ type: "rule" });
        i += 1;
      } else if (depth < MAX_DEPTH && QUOTE.test(line)) {
        i = quote(lines, i, depth, blocks);
      } else if (depth < MAX_DEPTH && (item = listItem(line)) && item.indent <= 3) {
        i = list(lines, i, depth, blocks);
      } else if ((m = tableAt(lines, i))) {
        i = table(lines, i, m, blocks);
      } else {
        i = paragraph(lines, i, blocks);
      }
    }
    return blocks;
  }

  function fencedCode(lines, i, open, blocks) {
    const closer = open.fence[0] === "`" ? "`" : "~";
    const close = new RegExp(`^ {0,3}${closer}{${open.fence.length},}[ \\t]*$`);
    const body = [];
    let j = i + 1;
    for (; j < lines.length && !close.test(lines[j]); j += 1) body.push(stripIndent(lines[j], open.indent));
    blocks.push({ type: "code", language: open.language, text: body.join("\n") });
    return j + 1;   // past the closing fence, or the end: an unclosed fence runs to the end
  }

  function quote(lines, i, depth, blocks) {
    const inner = [];
    for (; i < lines.length; i += 1) {
      const m = QUOTE.exec(lines[i]);
      if (m) inner.push(m[1]);
      else if (!isBlank(lines[i]) && !isBlank(inner[inner.length - 1]) && !startsBlock(lines, i)) {
        inner.push(lines[i]);   // a lazy continuation of the quoted paragraph
      } else break;
    }
    blocks.push({ type: "quote", blocks: parseBlocks(inner, depth + 1) });
    return i;
  }

  function list(lines, i, depth, blocks) {
    const first = listItem(lines[i]);
    const block = { type: "list", ordered: first.ordered, start: first.start, tight: true, items: [] };
    let item = first;
    while (item) {
      // Lines indented past the marker belong to the item; two spaces are enough, as people
      // (and models) nest under "1." with two.
      const threshold = Math.min(item.offset, item.indent + 2);
      const body = [item.text];
      let j = i + 1;
      for (; j < lines.length; j += 1) {
        const line = lines[j];
        if (isBlank(line)) body.push("");
        else if (indentOf(line) >= threshold) body.push(stripIndent(line, item.offset));
        else if (!isBlank(body[body.length - 1]) && !startsBlock(lines, j)) body.push(line.trimStart());
        else break;
      }
      let blanks = 0;
      while (body.length > 1 && isBlank(body[body.length - 1])) { body.pop(); blanks += 1; }
      if (body.some(isBlank) && !body.some((line) => openFence(line))) block.tight = false;
      block.items.push(parseBlocks(body, depth + 1));
      i = j;
      const next = i < lines.length ? listItem(lines[i]) : null;
      if (next && next.ordered === first.ordered && next.indent <= 3) {
        if (blanks) block.tight = false;
        item = next;
      } else {
        item = null;
      }
    }
    blocks.push(block);
    return i;
  }

  function table(lines, i, { head, align }, blocks) {
    const rows = [];
    let j = i + 2;
    for (; j < lines.length && !isBlank(lines[j]) && !startsBlock(lines, j); j += 1) {
      const cells = splitCells(lines[j]);
      rows.push(head.map((_, k) => cells[k] || ""));
    }
    blocks.push({ type: "table", head, align, rows });
    return j;
  }

  function paragraph(lines, i, blocks) {
    const text = [lines[i].trimStart()];
    let j = i + 1;
    for (; j < lines.length && !isBlank(lines[j]) && !interruptsParagraph(lines, j); j += 1) {
      text.push(lines[j].trimStart());
    }
    blocks.push({ type: "paragraph", text: text.join("\n") });
    return j;
  }

  function renderBlocks(blocks, parent, tight) {
    for (const block of blocks) {
      switch (block.type) {
        case "paragraph":
          if (tight) appendInline(parent, block.text, 0);
          else appendInline(el("p", parent), block.text, 0);
          break;
        case "heading":
          appendInline(el(`h${block.level}`, parent), block.text, 0);
          break;
        case "code": {
          const code = el("code", el("pre", parent), block.text);
          if (CODE_LANGUAGE.test(block.language)) code.className = `language-${block.language}`;
          break;
        }
        case "rule":
          el("hr", parent);
          break;
        case "quote":
          renderBlocks(block.blocks, el("blockquote", parent), false);
          break;
        case "list": {
          const list = el(block.ordered ? "ol" : "ul", parent);
          if (block.ordered && block.start !== 1) list.start = block.start;
          for (const item of block.items) renderBlocks(item, el("li", list), block.tight);
          break;
        }
        case "table": {
          const table = el("table", el("div", parent));
          table.parentNode.className = "table";
          const row = el("tr", el("thead", table));
          block.head.forEach((cell, k) => cellNode("th", row, cell, block.align[k]));
          const body = el("tbody", table);
          for (const cells of block.rows) {
            const tr = el("tr", body);
            cells.forEach((cell, k) => cellNode("td", tr, cell, block.align[k]));
          }
          break;
        }
        default:
          break;
      }
    }
  }

  function cellNode(tag, row, text, align) {
    const cell = el(tag, row);
    if (align) cell.style.textAlign = align;
    appendInline(cell, text, 0);
  }

  // -- inline --------------------------------------------------------------------------------

  function runLength(text, i, c) {
    let j = i;
    while (text[j] === c) j += 1;
    return j - i;
  }

  /** One linear pass over ``text`` that pairs what must be paired: each code span's backticks
   *  (a run of n backticks closes at the next run of exactly n, as CommonMark has it) and each
   *  [ with its ] outside code spans. Keeps the renderer linear on hostile text. */
  function analyse(text) {
    const runs = [];
    for (let k = text.indexOf("`"); k >= 0; k = text.indexOf("`", k)) {
      const n = runLength(text, k, "`");
      runs.push({ start: k, n });
      k += n;
    }
    const nextOfLength = new Map();
    const closer = runs.map(() => -1);
    for (let r = runs.length - 1; r >= 0; r -= 1) {
      closer[r] = nextOfLength.has(runs[r].n) ? nextOfLength.get(runs[r].n) : -1;
      nextOfLength.set(runs[r].n, r);
    }
    const code = new Map();   // opening backtick -> {close: closing run's start, end: past it}
    for (let r = 0; r < runs.length;) {
      if (closer[r] < 0) { r += 1; continue; }
      const close = runs[closer[r]].start;
      code.set(runs[r].start, { close, end: close + runs[r].n });
      r = closer[r] + 1;
    }
    const brackets = new Map();   // [ -> its ]
    const open = [];
    for (let k = 0; k < text.length; k += 1) {
      const c = text[k];
      if (c === "\\") k += 1;
      else if (c === "`" && code.has(k)) k = code.get(k).end - 1;
      else if (c === "[") open.push(k);
      else if (c === "]" && open.length) brackets.set(open.pop(), k);
    }
    return { text, code, brackets, failed: new Set() };
  }

  function codeSpan(scan, i) {
    const { text } = scan;
    const n = runLength(text, i, "`");
    const span = scan.code.get(i);
    if (!span) return { literal: text.slice(i, i + n), end: i + n };
    let content = text.slice(i + n, span.close).replace(/\n/g, " ");
    if (content.length > 2 && content[0] === " " && content[content.length - 1] === " " && /\S/.test(content)) {
      content = content.slice(1, -1);
    }
    return { build: (parent) => el("code", parent, content), end: span.end };
  }

  /** The closer of an emphasis of ``size`` (1: em, 2: strong or strike) made of ``c``, searched
   *  from ``from``: [where the closing delimiter starts, where it ends], or null. */
  function findCloser(scan, from, c, size) {
    const { text } = scan;
    let k = from;
    while (k < text.length) {
      if (text[k] === "`" && scan.code.has(k)) { k = scan.code.get(k).end; continue; }
      if (text[k] === "\\") { k += 2; continue; }
      if (text[k] !== c) { k += 1; continue; }
      const m = runLength(text, k, c);
      const end = k + m;
      const fits = c === "~" ? m === size : size === 2 ? m >= 2 : m === 1 || m >= 3;
      const afterSpace = SPACE.test(text[k - 1]);
      const intraword = c === "_" && WORD.test(text[end] || "");
      if (fits && !afterSpace && !intraword && k > from) return [end - size, end];
      k = end;
    }
    return null;
  }

  function emphasis(scan, i, depth) {
    const { text } = scan;
    const c = text[i];
    const n = runLength(text, i, c);
    const literal = { literal: text.slice(i, i + n), end: i + n };
    if (SPACE.test(text[i + n] || " ")) return literal;                     // not an opener
    if (c === "_" && WORD.test(text[i - 1] || "")) return literal;          // snake_case
    const sizes = c === "~" ? (n === 2 ? [2] : []) : n >= 2 ? [2, 1] : [1];
    for (const size of sizes) {
      // A search that failed fails from every later position too: remembering it keeps a
      // text full of lone asterisks linear.
      // ** opens with the run's first two (so ***x*** is <strong><em>x</em></strong>), * with
      // its last one (so **x* is *<em>x</em>).
      const key = `${c}${size}`;
      const open = size === 2 ? i : i + n - 1;
      const found = scan.failed.has(key) ? null : findCloser(scan, open + size, c, size);
      if (!found) {
        scan.failed.add(key);
        continue;
      }
      const tag = c === "~" ? "del" : size === 2 ? "strong" : "em";
      const prefix = text.slice(i, open);
      const content = text.slice(open + size, found[0]);
      return {
        build: (parent) => {
          if (prefix) parent.appendChild(document.createTextNode(prefix));
          appendInline(el(tag, parent), content, depth + 1);
        },
        end: found[1],
      };
    }
    return literal;
  }

  function link(scan, i, depth) {
    // [label](destination "optional title")
    const { text } = scan;
    const close = scan.brackets.get(i);
    if (close === undefined || text[close + 1] !== "(") return null;
    let k = close + 2;
    while (text[k] === " ") k += 1;
    let destination;
    if (text[k] === "<") {
      const end = text.indexOf(">", k);
      if (end < 0 || end - k > MAX_URL || text.slice(k, end).includes("\n")) return null;
      destination = text.slice(k + 1, end);
      k = end + 1;
    } else {
      let parens = 0;
      const begin = k;
      for (; k < text.length && k - begin <= MAX_URL && !SPACE.test(text[k]); k += 1) {
        if (text[k] === "\\") k += 1;
        else if (text[k] === "(" && ++parens > MAX_DEPTH) return null;
        else if (text[k] === ")" && --parens < 0) break;
      }
      destination = text.slice(begin, k);
    }
    while (text[k] === " ") k += 1;
    const quote = text[k];
    if (quote === '"' || quote === "'") {
      const end = text.indexOf(quote, k + 1);
      if (end < 0 || end - k > MAX_URL) return null;
      k = end + 1;
      while (text[k] === " ") k += 1;
    }
    if (text[k] !== ")") return null;
    const end = k + 1;
    const href = safeHref(destination.replace(/\\([!-/:-@[-`{-~])/g, "$1"));
    if (!href) return { literal: text.slice(i, end), end };    // shown as written, never a link
    const label = text.slice(i + 1, close);
    return {
      build: (parent) => appendInline(anchor(parent, href), label || href, depth + 1, true),
      end,
    };
  }

  function angleLink(scan, i) {
    const m = ANGLE_LINK.exec(scan.text.slice(i, i + MAX_URL));
    if (!m) return null;
    const href = safeHref(m[1].includes(":") ? m[1] : `mailto:${m[1]}`);
    if (!href) return null;
    return {
      build: (parent) => anchor(parent, href).appendChild(document.createTextNode(m[1])),
      end: i + m[0].length,
    };
  }

  function bareUrl(scan, i) {
    const m = BARE_URL.exec(scan.text.slice(i, i + MAX_URL));
    if (!m) return null;
    let url = m[0];
    for (;;) {   // trailing punctuation ends the sentence, not the URL
      const last = url[url.length - 1];
      if ("?!.,:;*_~'\"".includes(last)) url = url.slice(0, -1);
      else if (last === ")" && url.split("(").length < url.split(")").length) url = url.slice(0, -1);
      else break;
    }
    const href = /^https?:\/\/./i.test(url) ? safeHref(url) : null;
    if (!href) return null;
    return {
      build: (parent) => anchor(parent, href).appendChild(document.createTextNode(url)),
      end: i + url.length,
    };
  }

  /** Appends the inline content of ``text`` to ``parent``. ``inLink``: no links inside. */
  function appendInline(parent, text, depth, inLink = false) {
    const scan = analyse(text);
    let plain = "";
    const flush = () => {
      if (plain) parent.appendChild(document.createTextNode(plain));
      plain = "";
    };
    let i = 0;
    while (i < text.length) {
      const c = text[i];
      if (c === "\\" && i + 1 < text.length && PUNCTUATION.test(text[i + 1])) {
        plain += text[i + 1];
        i += 2;
        continue;
      }
      if (c === "\n") {
        flush();
        el("br", parent);
        i += 1;
        continue;
      }
      let span = null;
      if (c === "`") span = codeSpan(scan, i);
      else if ((c === "*" || c === "_" || c === "~") && depth < MAX_DEPTH) span = emphasis(scan, i, depth);
      else if (c === "[" && !inLink && depth < MAX_DEPTH) span = link(scan, i, depth);
      else if (c === "<" && !inLink) span = angleLink(scan, i);
      else if ((c === "h" || c === "H") && !inLink && !WORD.test(text[i - 1] || "")) span = bareUrl(scan, i);
      if (span && span.build) {
        flush();
        span.build(parent);
        i = span.end;
      } else if (span) {
        plain += span.literal;
        i = span.end;
      } else {
        plain += c;
        i += 1;
      }
    }
    flush();
  }

  // -- the interface -------------------------------------------------------------------------

  function render(text) {
    const fragment = document.createDocumentFragment();
    renderBlocks(parseBlocks(String(text).split(/\r\n?|\n/), 0), fragment, false);
    return fragment;
  }

  function renderInto(node, text) {
    node.replaceChildren(render(text));
  }

  return Object.freeze({ render, renderInto });
})();
