// fedmoe dashboard: while a page shows a live run (<main data-live="SECONDS">), fetch the same
// page again every few seconds and swap in its <main>. The server renders everything; this is
// the only script, and it talks to nothing but the page's own address.
(function () {
  "use strict";
  function schedule() {
    const main = document.querySelector("main[data-live]");
    if (!main) return;
    const seconds = Math.max(1, Number(main.dataset.live) || 3);
    setTimeout(refresh, seconds * 1000);
  }
  function refresh() {
    const open = Array.from(document.querySelectorAll("details[open]")).map((d) => d.parentElement.id);
    fetch(window.location.pathname, { credentials: "same-origin", cache: "no-store" })
      .then((response) => {
        if (response.redirected || !response.ok) throw new Error("status " + response.status);
        return response.text();
      })
      .then((html) => {
        const next = new DOMParser().parseFromString(html, "text/html").querySelector("main");
        const main = document.querySelector("main");
        if (!next || !main) return;
        main.replaceWith(next);
        for (const id of open) {
          const details = id && document.querySelector("#" + CSS.escape(id) + " details");
          if (details) details.open = true;
        }
        schedule();
      })
      .catch(() => setTimeout(refresh, 10000));
  }
  document.addEventListener("DOMContentLoaded", schedule);
})();
