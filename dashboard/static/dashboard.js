// jobwire dashboard: the live parts of the server-rendered pages.
// Everything a worker wrote is shown with textContent, never parsed as markup, and
// through visible(): its controls shown, not obeyed.

const DEPTH_CAP = 1000;
const MAX_TIMELINE_ROWS = 2000;
const MAX_LIVE_ROWS = 50;

const $ = (sel, root = document) => root.querySelector(sel);

// The rule of dashboard/present.py's visible(): C0 controls (but tab and newlines), DEL,
// C1 controls and the explicit bidi controls shown as their JSON escape (\u202e). No
// element contains those bidi controls (a stray U+2069 closes even a <bdi>'s isolate),
// so obeyed they would reorder what the page shows around a worker's text.
const HIDDEN = /[\u0000-\u0008\u000B\u000C\u000E-\u001F\u007F-\u009F\u202A-\u202E\u2066-\u2069]/g;

function visible(text) {
  return String(text ?? "").replace(
    HIDDEN,
    (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, "0")}`,
  );
}

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined && text !== null) node.textContent = visible(text);
  return node;
}

// Worker text in a list: a few lines shown (CSS), all of it in the tooltip.
function clipped(cell, text) {
  const shown = visible(text);
  if (!shown) {
    cell.replaceChildren();
    return;
  }
  let clip = $(".clip", cell);
  if (!clip) {
    clip = el("span", "clip");
    cell.replaceChildren(clip);
  }
  clip.textContent = shown;
  clip.title = shown;
}

function fmtTime(iso) {
  return iso ? iso.slice(0, 19).replace("T", " ") : "—";
}

function timeNode(iso) {
  if (!iso) return document.createTextNode("—");
  const node = el("time", "", fmtTime(iso));
  node.dateTime = iso;
  return node;
}

function fmtDuration(seconds) {
  if (seconds === null || seconds === undefined || Number.isNaN(seconds)) return "—";
  if (seconds < 60) return `${seconds.toFixed(1)} s`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)}m ${String(Math.floor(seconds % 60)).padStart(2, "0")}s`;
  return `${Math.floor(seconds / 3600)}h ${String(Math.floor((seconds % 3600) / 60)).padStart(2, "0")}m`;
}

const TERMINAL = ["SUCCEEDED", "FAILED", "CANCELLED"];

// The dashboard's clock less the browser's (ms), read as the page starts (its load time
// is within it): a browser's clock 10 minutes fast counted a job begun seconds ago as
// "10m 04s", one slow as "0.0 s" for minutes.
const CLOCK_SKEW = (() => {
  const now = Date.parse(document.body.dataset.now);
  return Number.isNaN(now) ? 0 : now - Date.now();
})();

// An unfinished job's duration: from its creation until now, counted while the page is
// open (the server's figure ends at the job's last event), by the dashboard's clock.
function tickElapsed() {
  const now = Date.now() + CLOCK_SKEW;
  for (const node of document.querySelectorAll(".elapsed")) {
    const since = Date.parse(node.dataset.since);
    if (!Number.isNaN(since)) node.textContent = fmtDuration(Math.max(0, (now - since) / 1000));
  }
}

// The cell counts from `created`, or shows `seconds` once the job has ended.
function durationCell(cell, created, seconds, ended) {
  if (ended) {
    if (seconds !== null && !Number.isNaN(seconds)) cell.textContent = fmtDuration(seconds);
    return;
  }
  if (!created || $(".elapsed", cell)) return;
  const node = el("span", "elapsed");
  node.dataset.since = created;
  cell.replaceChildren(node);
  tickElapsed();
}

// #live is a status region: what it says is announced. Saying it again (each retry of a
// stream that stays down set "reconnecting…" anew) is left out.
function setLive(state, text) {
  const node = $("#live");
  if (!node || (node.dataset.state === state && node.textContent === (text || state))) return;
  node.dataset.state = state;
  node.textContent = text || state;
}

// Where the keyboard's focus goes when what has it is removed or replaced: left alone,
// it fell to the top of the page. `node` is made focusable (from script only) if need be.
function focusOn(node) {
  if (!node.matches("a[href], button, input, select, [tabindex]")) node.tabIndex = -1;
  node.focus();
}

const hasFocus = (node) => Boolean(node?.contains(document.activeElement));

// Redrawn only when it changes: the job page's is a status region, where each redraw
// (every progress event) would be announced again.
function stateCell(cell, state, stalled) {
  if (cell.textContent.trim() === (stalled ? `${state} STALLED` : state)) return;
  cell.replaceChildren(el("span", `badge state-${state}`, state));
  if (stalled) cell.append(" ", el("span", "badge stalled", "STALLED"));
}

function progressCell(cell, change) {
  if (change.percent === undefined) return;
  let bar = $("progress", cell);
  if (!bar) {
    cell.replaceChildren();
    bar = el("progress");
    bar.max = 100;
    bar.setAttribute("aria-label", `progress of ${visible(change.id)}`);
    const media = el("span", "media");
    media.title = "position in the video / its length";
    media.hidden = true;
    cell.append(bar, " ", el("span", "pct"), " ", el("span", "phase"), " ", media);
  }
  bar.value = change.percent;
  // Cut, never rounded up (99.96 is not done), as the server's template does.
  $(".pct", cell).textContent = `${Math.floor(change.percent)}%`;
  if (change.media !== undefined) {
    const media = $(".media", cell);
    media.textContent = change.media;
    media.hidden = !change.media;
  }
  if (change.phase === undefined) return; // the event says nothing of it: kept
  const phase = $(".phase", cell);
  phase.textContent = visible(change.phase);
  if (phase.textContent) phase.title = phase.textContent;
  else phase.removeAttribute("title");
}

// Asks the stream's URL for its headers only: 401 means the session is over, 404 that
// the job is gone; 0: the dashboard is away (keep trying).
async function streamStatus(url) {
  try {
    const reply = await fetch(url, { method: "HEAD", credentials: "same-origin" });
    return reply.status;
  } catch {
    return 0;
  }
}

function loggedOut() {
  const node = $("#live");
  if (!node) return;
  node.dataset.state = "logged-out";
  const link = el("a", "", "session ended: log in again");
  link.href = `/login?next=${encodeURIComponent(location.pathname + location.search)}`;
  node.replaceChildren(link);
}

// This tab's open streams, and the other tabs of this browser: the login page (where
// Log out leads) asks them to check their session. Their streams, opened with the
// cookie Log out deleted, went on showing every change for the rest of the session.
const streams = new Set();
const tabs = "BroadcastChannel" in window ? new BroadcastChannel("jobwire-session") : null;
if (tabs) tabs.onmessage = () => streams.forEach((s) => s.check());

// The server sends something at least every heartbeat; hearing nothing for this long
// means the connection went silent (a dead NAT entry, a hung proxy), which EventSource
// never notices on its own.
const QUIET_MS = Math.max(3 * Number($("#live")?.dataset.heartbeat || 15), 3) * 1000;

// An EventSource that also recovers when the browser gives up (a 5xx while the
// dashboard restarts closes it for good) or its connection goes silent: a new one
// starts from `url()`. `onEnd`: the stream said `end`; `onGone`: its URL answers 404
// (the job was deleted); `connected`: what #live says while it is open (or a function
// that says it when it opens).
function stream(url, handlers, onReopen, { onEnd, onGone, connected = ["live", "live"] } = {}) {
  let source = null;
  let opened = "";
  let delay = 500;
  let failed = false;
  let ended = false;
  let watchdog = null;
  const heard = () => {
    clearTimeout(watchdog);
    if (ended) return;
    watchdog = setTimeout(() => {
      failed = true;
      setLive("reconnecting", "reconnecting…");
      reopen();
    }, QUIET_MS);
  };
  const reopen = () => {
    clearTimeout(watchdog);
    source.close();
    if (!ended) open();
  };
  const open = () => {
    opened = url();
    source = new EventSource(opened);
    heard();
    for (const [name, fn] of Object.entries(handlers)) {
      source.addEventListener(name, (msg) => {
        heard();
        fn(JSON.parse(msg.data), source);
      });
    }
    // The streams' heartbeats (a job's `ping`, the jobs stream's `stats`), heard also
    // where no handler reads them (an ended job's page, waiting for its deletion).
    source.addEventListener("ping", heard);
    source.addEventListener("stats", heard);
    source.addEventListener("end", () => {
      stop();
      setLive("ended", "finished");
      onEnd?.();
    });
    source.onopen = () => {
      heard();
      delay = 500;
      setLive(...(typeof connected === "function" ? connected() : connected));
      if (failed && onReopen) onReopen();
      failed = false;
    };
    source.onerror = () => {
      if (ended) return;
      failed = true;
      setLive("reconnecting", "reconnecting…");
      if (source.readyState === EventSource.CLOSED) {
        clearTimeout(watchdog); // the reopen below re-arms it
        const wait = delay;
        delay = Math.min(delay * 2, 5000);
        // A 401 (the session ended) or a 404 (the job deleted meanwhile) would be
        // retried forever as "reconnecting…".
        streamStatus(opened).then((status) => {
          if (ended) return;
          if (status === 401) {
            ended = true;
            loggedOut();
          } else if (status === 404 && onGone) {
            stop();
            onGone();
          } else setTimeout(reopen, wait);
        });
      }
    };
  };
  const stop = () => {
    ended = true;
    clearTimeout(watchdog);
    source.close();
  };
  open();
  // refresh(): reopens when the URL it would use now differs (the browser's own
  // reconnect reuses the first one). close(): for good. check(): ends it when the
  // session has (logged out in another tab).
  const handle = {
    refresh() {
      if (ended || url() === opened) return;
      reopen();
    },
    close: stop,
    check() {
      streamStatus(opened).then((status) => {
        if (status !== 401 || ended) return;
        stop();
        loggedOut();
      });
    },
  };
  streams.add(handle);
  return handle;
}

// `read` run one at a time: asks while it runs make one more run once it is over. It
// returns false when it failed (the asks made meanwhile are then dropped with it).
function oneAtATime(read) {
  let reading = false;
  let again = false;
  return async () => {
    if (reading) {
      again = true;
      return;
    }
    reading = true;
    try {
      do {
        again = false;
        if (!(await read())) break;
      } while (again);
    } finally {
      reading = false;
    }
  };
}

// -- jobs page -----------------------------------------------------------------

// The list a job page was opened from (its filters, order and page), per tab: the job
// page's "← Jobs" and Delete job lead back to it (they led to /jobs, every filter gone).
// The Referrer-Policy (no-referrer) keeps it out of document.referrer.
const LIST_KEY = "jobwire:list";

function rememberList() {
  const url = new URL(location.href);
  url.searchParams.delete("deleted"); // the notice is this load's only
  try {
    sessionStorage.setItem(LIST_KEY, url.pathname + url.search);
  } catch {
    // storage off: the job page leads to the whole list, as it did
  }
}

function rememberedList() {
  let list = null;
  try {
    list = sessionStorage.getItem(LIST_KEY);
  } catch {
    return null;
  }
  return list === "/jobs" || list?.startsWith("/jobs?") ? list : null;
}

function jobsPage() {
  rememberList();
  // Delete job led here: the focus (a screen reader with it) starts on "Job … was
  // deleted." (a status there as the page loads is not announced; it started at the top).
  const notice = $("#deleted");
  if (notice) focusOn(notice);
  const table = $("#jobs");
  const tbody = $("tbody", table);
  const kind = table.dataset.kind;
  const states = table.dataset.states.split(",").filter(Boolean);
  const filtered = Number(table.dataset.labels) > 0;
  const paged = table.dataset.paged === "1";
  // Where a new job belongs: newest first, on the first page; oldest first, on the last
  // page; there, by its create time, as a reload would show it.
  const oldestFirst = table.dataset.order === "oldest";
  const more = table.dataset.more === "1";
  const elsewhere = oldestFirst ? more : paged;
  const rows = new Map();
  for (const tr of tbody.rows) rows.set(tr.dataset.job, tr);
  const live = [];

  const newRow = (change) => {
    const tr = el("tr", "fresh");
    tr.dataset.job = change.id;
    // Below any job's: a queued job a re-read adds has no event yet (sequence 0), and
    // its row, taken as up to date, showed no state, Updated or Duration.
    tr.dataset.seq = "-1";
    tr.dataset.created = change.created || "";
    const cells = ["id", "kind", "state", "progress", "message", "created", "updated", "duration"];
    const labels = [
      "Job",
      "Kind",
      "State",
      "Progress",
      "Message",
      "Created (UTC)",
      "Updated (UTC)",
      "Duration",
    ];
    cells.forEach((name, i) => {
      const td = el("td", name);
      td.dataset.label = labels[i];
      tr.append(td);
    });
    const link = el("a", "", change.id);
    link.href = `/jobs/${encodeURIComponent(change.id)}`;
    $(".id", tr).append(link);
    $(".kind", tr).textContent = (change.kind || "").toLowerCase();
    $(".created", tr).append(timeNode(change.created));
    const start = { id: change.id, percent: change.percent ?? 0, phase: change.phase || "" };
    progressCell($(".progress", tr), start);
    return tr;
  };

  // The row a new job goes before (null: at the end), in the service's order: create
  // time, then id (the times are ISO strings of one width, so they compare as strings).
  // undefined: it belongs on another page (newest first: older than the last row, with
  // later pages; oldest first: older than the first row, with earlier pages). A job the
  // dashboard did not see begin has no create time: on top (newest first) or last.
  const placeOf = (change) => {
    const created = change.created || "";
    if (!created) return oldestFirst ? null : tbody.firstElementChild;
    for (const tr of tbody.rows) {
      const shown = tr.dataset.created || "";
      const newer = created > shown || (created === shown && change.id > tr.dataset.job);
      if (oldestFirst ? !newer : newer) {
        return oldestFirst && paged && tr === tbody.firstElementChild ? undefined : tr;
      }
    }
    return oldestFirst || !more ? null : undefined;
  };

  const drop = (id) => {
    const tr = rows.get(id);
    if (hasFocus(tr)) {
      // The next row's link (else the previous row's, else the table) has the focus.
      const near = tr.nextElementSibling || tr.previousElementSibling;
      focusOn(near ? $("a", near) : table);
    }
    tr?.remove();
    rows.delete(id);
    const at = live.indexOf(id);
    if (at >= 0) live.splice(at, 1);
    // The last row gone: the page says so, as a reload would (it showed an empty frame).
    if (!tbody.rows.length) $("#empty").hidden = false;
  };

  // `listed`: the row came from this page's own query (a re-read), so it belongs here.
  const apply = (change, listed = false) => {
    let tr = rows.get(change.id);
    if (tr && change.created && tr.dataset.created && change.created !== tr.dataset.created) {
      // Another job of this id (the row's was deleted, and one made again under its id):
      // the row goes, and the new job is placed as a reload would place it.
      drop(change.id);
      tr = undefined;
    }
    if (!tr) {
      // A job this page does not show: add it on top when this is its first event (it
      // just became active; `new`: its first event came since the last push, coalesced
      // into a later one) and it belongs here; later events of jobs on other pages
      // never churn this one.
      if (!listed && ((change.sequence !== 1 && !change.new) || filtered || elsewhere)) return;
      if (states.length && !states.includes(change.state)) return;
      if (kind && change.kind !== kind) return;
      const next = placeOf(change);
      if (next === undefined && !listed) return; // another page's, by its create time
      tr = newRow(change);
      tbody.insertBefore(tr, next ?? null);
      rows.set(change.id, tr);
      live.push(change.id);
      $("#empty").hidden = true;
      if (live.length > MAX_LIVE_ROWS) {
        // The page stays bounded, but the row dropped leaves a hole (newer rows above
        // it, older below, and paging goes on after the last): say so.
        drop(live[0]);
        $("#live-cut").hidden = false;
      }
    }
    if (Number(tr.dataset.seq) >= change.sequence) return; // older than what is shown
    if (states.length && !states.includes(change.state)) {
      drop(change.id); // left the page's state filter: a reload would not show it either
      return;
    }
    tr.dataset.seq = String(change.sequence);
    tr.dataset.state = change.state;
    stateCell($(".state", tr), change.state, change.stalled);
    progressCell($(".progress", tr), change);
    if (change.message !== undefined) clipped($(".message", tr), change.message);
    if (change.created && !tr.dataset.created) tr.dataset.created = change.created;
    $(".updated", tr).replaceChildren(timeNode(change.updated));
    const created = Date.parse(tr.dataset.created);
    const updated = Date.parse(change.updated);
    const ended = TERMINAL.includes(change.state);
    const seconds = change.duration ?? (updated - created) / 1000;
    durationCell($(".duration", tr), tr.dataset.created, seconds, ended);
  };

  // After a reconnect the shown rows are read again: what changed meanwhile is not lost.
  // Also when a job enters the page's state filter (the server says so), to place it as
  // a reload would. A read that fails (the service still starting: 503) is tried again,
  // not dropped. One read at a time; asks meanwhile make one more.
  let retry = null;
  const resync = oneAtATime(async () => {
    clearTimeout(retry);
    const shownBefore = new Set(rows.keys()); // a row added while it reads is not in it
    try {
      const reply = await fetch(`/api/jobs?${table.dataset.query}`, { credentials: "same-origin" });
      if (reply.status >= 500) throw new Error(`status ${reply.status}`);
      if (!reply.ok) return false;
      const body = await reply.json();
      for (const job of body.jobs) apply(job, true);
      // A row shown before it read, which it does not list where it would be (anywhere,
      // when it has no next page), is not this page's any more: its job was deleted
      // while the stream could not say so (the dashboard restarted, a gap). It stayed,
      // its link answering 404.
      const listed = new Set(body.jobs.map((j) => j.id));
      const last = body.jobs[body.jobs.length - 1];
      const within = (tr) => {
        if (!body.next_page_token) return true;
        if (!last || !tr.dataset.created) return false;
        const created = tr.dataset.created;
        const newer =
          created > last.created || (created === last.created && tr.dataset.job > last.id);
        return oldestFirst ? !newer : newer;
      };
      for (const [id, tr] of [...rows]) {
        if (shownBefore.has(id) && !listed.has(id) && within(tr)) drop(id);
      }
      // Rows it added are followed too: a job that began while the stream was away
      // (its first event unseen) stood still at what the re-read showed. The stream
      // reopens with them (when they are new), and its own re-read covers the switch.
      source.refresh();
      return true;
    } catch {
      retry = setTimeout(resync, 2000);
      return false;
    }
  });

  // The dashboard's own stream from the service broke (or is back): say so.
  const upstream = (u) => {
    if (u.connected) setLive("live", "live");
    else setLive("reconnecting", "reconnecting…");
  };

  const stats = (s) => {
    $("#eps").textContent = String(s.eps);
    for (const [name, n] of Object.entries(s.depth || {})) {
      const node = document.querySelector(`[data-depth="${CSS.escape(name)}"]`);
      if (node) node.textContent = n > DEPTH_CAP ? `${DEPTH_CAP}+` : String(n);
    }
  };

  // The server sends only the rows shown here (and, where new rows belong, every job's
  // first event), so a firehose over other jobs never reaches this tab.
  const url = () => {
    const params = new URLSearchParams();
    if (kind) params.set("kind", kind);
    const ids = [...rows.keys()].join(",");
    if (ids.length <= 6000 && rows.size <= 500) params.set("ids", ids);
    if (filtered || elsewhere) params.set("new", "0");
    // A job that enters one of these states makes the server tell this tab to re-read.
    if (states.length) params.set("states", states.join(","));
    // What changed between the rows' read and this stream is replayed from this mark.
    params.set("since", table.dataset.since || "");
    return `/events/jobs?${params}`;
  };
  let source = null;
  const reopened = () => {
    source.refresh(); // rows added since the first connect are followed too
    resync();
  };
  // Jobs deleted (Delete job, DeleteJob, the retention): their rows go, as a reload
  // would not show them (they stayed, their links answering 404).
  const deleted = (ids) => ids.forEach((id) => rows.has(id) && drop(id));
  const handlers = {
    jobs: (list) => list.forEach((c) => apply(c)),
    deleted,
    stats,
    upstream,
    resync: () => resync(),
  };
  source = stream(url, handlers, reopened);
}

// -- job page ------------------------------------------------------------------

function jobPage() {
  const head = $("#job");
  const list = rememberedList();
  if (list) {
    $("#back").href = list;
    $("#gone a").href = list;
    const back = $("#delete input[name=back]");
    if (back) back.value = list;
  }
  const jobId = head.dataset.job;
  const tbody = $("#timeline tbody");
  let lastSeq = Number(head.dataset.seq);

  // The tab's title says the job's state first ("running · Job … · jobwire"), as it is
  // now: a job watched from a background tab said nothing of it ending.
  const titled = document.title.slice(document.title.indexOf(" · ") + 3);
  const retitle = (state) => {
    document.title = `${state} · ${titled}`;
  };

  const showHead = (job) => {
    head.dataset.state = job.state;
    stateCell($(".state", head), job.state, job.stalled);
    retitle(`${job.state.toLowerCase()}${job.stalled ? ", stalled" : ""}`);
    progressCell($(".progress", head), job);
    if (job.message !== undefined) {
      const message = $("#message");
      message.textContent = visible(job.message);
      message.title = message.textContent;
    }
    if (job.updated) $("#updated").replaceChildren(timeNode(job.updated));
    if (TERMINAL.includes(job.state)) {
      const remove = $("#delete");
      if (remove) remove.hidden = false;
      // Cancel goes; Delete takes its place, for the keyboard too.
      if (hasFocus($("#cancel")) && remove) focusOn($("button", remove));
      $("#cancel")?.remove();
      const since = $("#duration .elapsed")?.dataset.since;
      if (since && job.updated) {
        const seconds = job.duration ?? (Date.parse(job.updated) - Date.parse(since)) / 1000;
        durationCell($("#duration"), since, seconds, true);
      }
    }
  };

  const appendEvent = (e) => {
    const tr = el("tr");
    tr.dataset.seq = String(e.sequence);
    const seq = e.coalesced_from ? `${e.coalesced_from}–${e.sequence}` : String(e.sequence);
    tr.append(el("td", "seq", seq), el("td", "type", e.type), el("td", "state", e.state));
    const when = el("td", "time");
    when.append(timeNode(e.time));
    tr.append(when);
    const percent = el("td", "percent", e.percent === null ? "" : `${e.percent.toFixed(1)}%`);
    if (e.media) percent.append(" ", el("span", "media", e.media));
    tr.append(percent);
    tr.append(el("td", "ev-phase", e.phase), el("td", "message", e.message));
    tbody.append(tr);
    $("#no-events").hidden = true;
    if (tbody.rows.length > MAX_TIMELINE_ROWS) {
      while (tbody.rows.length > MAX_TIMELINE_ROWS) tbody.rows[0].remove();
      // The notice names where the timeline now starts (it named where it started).
      // (A coalesced first row reads "12–15": it starts at 12.)
      $("#gap-oldest").textContent = String(parseInt($(".seq", tbody.rows[0]).textContent, 10));
      $("#gap-notice").hidden = false;
    }
  };

  // What events do not carry (started, ended, process id, attempts, the outcome, the
  // log lines, the artifacts, the head's message as the page words it) is read again
  // from the page itself when the job's state changes: those stayed "—", "No
  // artifacts.", the log lines of the page's load (a job failed by an ERROR line did
  // not show it) and the timeline's wording of the message until a reload. One read at
  // a time; changes meanwhile make one more.
  const reread = oneAtATime(async () => {
    try {
      const reply = await fetch(location.href, { credentials: "same-origin" });
      if (!reply.ok) return false;
      const page = new DOMParser().parseFromString(await reply.text(), "text/html");
      for (const id of ["details", "outcome", "logs", "logs-cut", "artifacts-card"]) {
        const fresh = page.getElementById(id);
        const shown = document.getElementById(id);
        if (!fresh || !shown) continue;
        const focused = hasFocus(shown) ? document.activeElement : null;
        shown.replaceWith(document.adoptNode(fresh));
        if (focused) {
          // The same link (an artifact's) in the fresh section, else the section.
          const href = focused.getAttribute("href");
          const links = [...fresh.querySelectorAll("a[href]")];
          focusOn(links.find((a) => a.getAttribute("href") === href) || fresh);
        }
      }
      const message = page.getElementById("message");
      if (message) {
        const shown = $("#message");
        shown.textContent = message.textContent; // already made visible by the server
        shown.title = message.textContent;
      }
      return true;
    } catch {
      return false; // the dashboard is away: a reload shows it all
    }
  });

  const events = (list) => {
    let changed = false;
    for (const e of list) {
      if (e.sequence <= lastSeq) continue; // never twice, whatever a reconnect replays
      lastSeq = e.sequence;
      appendEvent(e);
      changed ||= e.state !== head.dataset.state;
      const change = { state: e.state, stalled: e.type === "STALLED", updated: e.time };
      if (e.percent !== null) {
        // A progress event carries the job's progress whole: its media times too.
        Object.assign(change, { percent: e.percent, phase: e.phase, media: e.media });
      }
      // A progress says its message, "" included (a reload shows it so).
      if (e.type === "PROGRESS" || e.message) change.message = e.message;
      if (e.type === "COMPLETED") change.percent = 100;
      showHead(change);
      if (["COMPLETED", "FAILED", "CANCELLED"].includes(e.type)) {
        const hint = $("#outcome-reload");
        $("#outcome").hidden = false;
        hint.hidden = false;
      }
    }
    head.dataset.seq = String(lastSeq);
    if (changed) reread();
  };

  const gap = (g) => {
    // Going back: the job's history ends before this page's (the service was restored
    // from an older backup). Its timeline is not the job's any more: show it afresh.
    if (g.oldest <= g.requested) {
      location.reload();
      return;
    }
    $("#gap-oldest").textContent = String(g.oldest);
    $("#gap-notice").hidden = false;
  };

  const url = () => `/events/jobs/${encodeURIComponent(jobId)}?from=${lastSeq}`;
  // Each connection opens with the job as it is now, before the events it missed: a
  // state changed meanwhile (it ended before the stream opened or while it reconnected)
  // is a change too, else the events that follow look like none.
  const snapshot = (job) => {
    const changed = job.state !== head.dataset.state;
    showHead(job);
    if (changed) reread();
  };
  // The job was deleted (here, in another tab, by DeleteJob or the retention): the page
  // says so at once (the jobs stream carries the deletion). It went on showing the job as
  // if it were still there.
  const gone = () => {
    const notice = $("#gone");
    notice.hidden = false;
    if (hasFocus($("#delete"))) focusOn($("a", notice));
    $("#delete")?.remove();
    $("#cancel")?.remove();
    head.dataset.deleted = "1";
    setLive("deleted", "deleted");
    retitle("deleted");
  };
  // A job made again under the id once this one was deleted: the page shows the new job
  // (it went on showing the deleted one when both happened within a few seconds).
  const remade = (list) => {
    if (head.dataset.deleted && list.some((j) => j.id === jobId)) location.reload();
  };
  // The jobs stream broke or lost events (`resync`): a deletion may be among them, so
  // the job is read again: gone, or another job of the id, which the page then shows.
  const recheck = async () => {
    try {
      const reply = await fetch(`/api/jobs/${encodeURIComponent(jobId)}`, {
        credentials: "same-origin",
      });
      if (reply.status === 404) gone();
      else if (reply.ok && (await reply.json()).job.created !== head.dataset.created) {
        location.reload();
      }
    } catch {
      // The dashboard is away: the stream's reconnect asks again.
    }
  };
  // An ended job's stream is over; only its deletion can happen now, which the jobs
  // stream following this one job pushes (`deleted`), and then a job made again under
  // its id (its first event, in `jobs`). From the page's mark: a deletion since the page
  // read the job is replayed (made before this stream opened, while the dashboard
  // restarted), or the page reads the job again (`resync`).
  const ended = () => {
    const only = new URLSearchParams({ ids: jobId, new: "0", since: head.dataset.since });
    const handlers = { deleted: gone, jobs: remade, resync: recheck };
    stream(() => `/events/jobs?${only}`, handlers, null, {
      connected: () => (head.dataset.deleted ? ["deleted", "deleted"] : ["ended", "finished"]),
    });
  };
  stream(url, { snapshot, events, gap }, null, { onEnd: ended, onGone: gone });

  for (const form of [$("#cancel"), $("#delete")]) {
    form?.addEventListener("submit", (ev) => {
      if (!window.confirm(form.dataset.confirm)) ev.preventDefault();
    });
  }
  // A pick with the pointer applies at once. From the keyboard every arrow key is a
  // change: those only choose, and Show applies (else the first key reloaded the page).
  const level = $("#level");
  if (level) {
    let keyed = false;
    level.addEventListener("keydown", () => {
      keyed = true;
    });
    level.addEventListener("pointerdown", () => {
      keyed = false;
    });
    level.addEventListener("change", () => {
      if (!keyed) $("#level-form").submit();
    });
  }
}

const pages = { jobs: jobsPage, job: jobPage, login: () => tabs?.postMessage("check") };
pages[document.body.dataset.page]?.();
tickElapsed();
setInterval(tickElapsed, 1000);
