"""The playground page: one HTML document with its script, served at ``/``.

The script calls the JSON API (``POST /api/generate``) and shows the kept images with their CLIP
scores, all candidates on request, download links, and the captions tried so far. Every caption and
message is put on the page as text (``textContent``), never as HTML. An access token, when the server
has one, is read from the page's address (``/?token=...``) and sent as ``Authorization: Bearer``.
"""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>dalle-repro playground</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body { font-family: system-ui, sans-serif; margin: 1.5em; max-width: 70em; }
 fieldset { border: 1px solid #ccc; margin: 0.6em 0; }
 label { margin-right: 1em; white-space: nowrap; }
 input[type=number] { width: 5em; }
 #caption { width: 40em; max-width: 95%; font-size: 1.1em; }
 .pics { display: flex; flex-wrap: wrap; gap: 8px; margin: 0.5em 0; }
 figure { margin: 0; text-align: center; font-size: 0.85em; }
 figure img { width: 128px; height: 128px; image-rendering: pixelated; border: 1px solid #ddd; }
 #status { color: #555; min-height: 1.4em; }
 #status.error { color: #b00; }
 #history li { cursor: pointer; text-decoration: underline dotted; }
</style>
</head>
<body>
<h1>dalle-repro playground</h1>
<p id="model"></p>
<form id="form">
 <input id="caption" name="caption" placeholder="a small red circle on the left" autocomplete="off">
 <button id="go" type="submit">Generate</button>
 <fieldset><legend>Sampling</legend>
  <label>candidates <input type="number" id="candidates" value="16" min="1" max="256"></label>
  <label>kept <input type="number" id="keep" value="4" min="1" max="64"></label>
  <label>temperature <input type="number" id="temperature" value="0.7" min="0" max="5" step="0.05"></label>
  <label>top-k <input type="number" id="top_k" min="1" placeholder="all"></label>
  <label>top-p <input type="number" id="top_p" min="0.01" max="1" step="0.01" placeholder="1"></label>
  <label>guidance <input type="number" id="guidance" value="1" min="0" max="20" step="0.5"></label>
  <label>seed <input type="number" id="seed" value="0" min="0"></label>
  <label><input type="checkbox" id="grid"> show all candidates</label>
 </fieldset>
 <fieldset><legend>Edit an image (optional)</legend>
  <label>image <input type="file" id="init_image" accept="image/png,image/jpeg"></label>
  <label>keep top token rows <input type="number" id="init_rows" value="0" min="0"></label>
  <label>or redraw box x0,y0,x1,y1 <input id="edit_box" placeholder="8,8,24,24" size="12"></label>
 </fieldset>
</form>
<div id="status"></div>
<div id="results"></div>
<h3>Captions tried</h3>
<ol id="history"></ol>
<script>
const token = new URLSearchParams(location.search).get("token");
const headers = {"Content-Type": "application/json"};
if (token) headers["Authorization"] = "Bearer " + token;
const $ = (id) => document.getElementById(id);
function status(text, error) { $("status").textContent = text; $("status").className = error ? "error" : ""; }
function num(id) { const v = $(id).value; return v === "" ? null : Number(v); }
function figure(png, label, name) {
  const f = document.createElement("figure");
  const img = document.createElement("img");
  img.src = "data:image/png;base64," + png; img.alt = label;
  const cap = document.createElement("figcaption");
  const a = document.createElement("a");
  a.href = img.src; a.download = name; a.textContent = label;
  cap.appendChild(a); f.appendChild(img); f.appendChild(cap);
  return f;
}
function readFile(file) {
  return new Promise((ok, fail) => {
    const r = new FileReader();
    r.onload = () => ok(String(r.result).split(",")[1]);
    r.onerror = () => fail(r.error);
    r.readAsDataURL(file);
  });
}
fetch("/api/info", {headers}).then(r => r.json()).then(info => {
  $("model").textContent = "model: " + info.model + " (" + info.grid + "x" + info.grid + " tokens, " +
    info.image_size + " px" + (info.clip ? ", reranked by CLIP" : ", no CLIP: unranked") + ")";
}).catch(() => {});
$("form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const caption = $("caption").value;
  const body = {caption, candidates: num("candidates"), keep: num("keep"), temperature: num("temperature"),
    top_k: num("top_k"), top_p: num("top_p"), guidance: num("guidance"), seed: num("seed"), grid: $("grid").checked};
  const file = $("init_image").files[0];
  if (file) {
    body.init_image = await readFile(file);
    body.init_rows = num("init_rows") || 0;
    const box = $("edit_box").value.trim();
    if (box) body.edit_box = box.split(",").map(Number);
  }
  $("go").disabled = true;
  status("sampling...", false);
  try {
    const r = await fetch("/api/generate", {method: "POST", headers, body: JSON.stringify(body)});
    const data = await r.json();
    if (!r.ok) { status("error " + r.status + ": " + (data.error || JSON.stringify(data)), true); return; }
    const block = document.createElement("section");
    const h = document.createElement("h3");
    h.textContent = data.caption;
    block.appendChild(h);
    const kept = document.createElement("div");
    kept.className = "pics kept";
    data.images.forEach((im, i) => kept.appendChild(
      figure(im.png, im.score === null ? "#" + i : im.score.toFixed(3), "sample-" + i + ".png")));
    block.appendChild(kept);
    if (data.candidates) {
      const all = document.createElement("div");
      all.className = "pics all";
      data.candidates.forEach((im, i) => all.appendChild(
        figure(im.png, im.score === null ? "#" + i : im.score.toFixed(3), "candidate-" + i + ".png")));
      const t = document.createElement("p"); t.textContent = "all candidates, in generation order:";
      block.appendChild(t); block.appendChild(all);
    }
    $("results").prepend(block);
    const li = document.createElement("li");
    li.textContent = data.caption;
    li.addEventListener("click", () => { $("caption").value = li.textContent; });
    $("history").prepend(li);
    status(data.images.length + " images in " + data.seconds.toFixed(1) + " s (batched with " +
      (data.batched_with - 1) + " other requests)", false);
  } catch (e) {
    status("error: " + e, true);
  } finally {
    $("go").disabled = false;
  }
});
</script>
</body>
</html>
"""
