// gallery-bridge web: label buttons and keyboard shortcuts. Loaded as a file (the CSP allows no inline script).
"use strict";

(function () {
  const csrf = () => document.querySelector('meta[name="csrf-token"]').content;

  function cards() {
    return Array.from(document.querySelectorAll(".card[data-item]"));
  }

  let current = -1;

  function select(i) {
    const all = cards();
    if (!all.length) return;
    current = Math.max(0, Math.min(all.length - 1, i));
    all.forEach((c, j) => c.classList.toggle("selected", j === current));
    all[current].focus({ preventScroll: true });
    all[current].scrollIntoView({ block: "nearest" });
  }

  function selected() {
    const all = cards();
    if (all.length === 1) return all[0];
    return current >= 0 ? all[current] : null;
  }

  function setState(card, text, cls) {
    const el = card.querySelector(".state");
    if (el) {
      el.textContent = text;
      el.className = "state " + (cls || "");
    }
  }

  async function label(item, value) {
    const card = document.querySelector(`.card[data-item="${CSS.escape(item)}"]`);
    if (card) setState(card, "saving…", "busy");
    let reply, body;
    try {
      reply = await fetch(`/api/items/${encodeURIComponent(item)}/label`, {
        method: "POST",
        credentials: "same-origin",
        headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf() },
        body: JSON.stringify({ label: value }),
      });
      body = await reply.json();
    } catch (err) {
      if (card) setState(card, "failed: " + err, "error");
      return;
    }
    if (!card) return;
    if (!reply.ok) {
      setState(card, "failed: " + (body.message || reply.status), "error");
      return;
    }
    let text = "labelled " + value;
    if (item.startsWith("r") && value === "good" && body.gallery_id != null) text += " · added to the gallery";
    if (item.startsWith("g") && value === "bad") text += " · removed from the gallery";
    setState(card, text, "done " + value);
    card.dataset.label = value;
  }

  document.addEventListener("click", (ev) => {
    const btn = ev.target.closest("button.label[data-item]");
    if (!btn) return;
    ev.preventDefault();
    label(btn.dataset.item, btn.dataset.label);
  });

  document.addEventListener("keydown", (ev) => {
    if (ev.ctrlKey || ev.metaKey || ev.altKey) return;
    const tag = (ev.target.tagName || "").toLowerCase();
    if (tag === "input" || tag === "textarea" || tag === "select") return;
    const card = selected();
    switch (ev.key) {
      case "j": select(current + 1); break;
      case "k": select(current - 1); break;
      case "g": if (card) label(card.dataset.item, "good"); break;
      case "b": if (card) label(card.dataset.item, "bad"); break;
      case "o":
      case "Enter": {
        const link = card && card.querySelector("a[href]");
        if (link && cards().length > 1) window.location.href = link.href;
        break;
      }
      case "/": ev.preventDefault(); document.getElementById("q").focus(); break;
      default: return;
    }
  });
})();
