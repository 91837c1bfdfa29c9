// Atlas web chat: one WebSocket to the user's room, replies streamed as they arrive.
// Replies are resumable: after a dropped connection the page asks for the rest of the reply in
// flight (agent:resume from the last seq it has); after a reload it asks the room which requests
// it still has (agent:list) and resumes the one its stored history was waiting for.
// No build step and no dependencies. No reply text ever reaches the page as HTML: the user's
// messages are set with textContent, and replies are built from parsed Markdown with
// createElement and textContent by markdown.js, so a reply that contains HTML or a script is
// shown as text.
"use strict";

(() => {
  const KEY = {
    token: "atlas.token",
    user: "atlas.user",
    conversation: "atlas.conversationId",
    messages: (user, conversation) => `atlas.messages.${user}.${conversation}`,
  };
  const KEPT_MESSAGES = 200;
  const FATAL_CLOSES = { 4001: "The token was not accepted.", 4003: "This token belongs to another user.", 4400: "Invalid user id." };

  const $ = (id) => document.getElementById(id);
  const ui = {
    status: $("status"), statusText: $("status-text"), messages: $("messages"), empty: $("empty"),
    scroller: $("scroller"), composer: $("composer"), input: $("input"), send: $("send"), stop: $("stop"),
    settings: $("settings"), settingsForm: $("settings-form"), userField: $("user-field"),
    tokenField: $("token-field"), settingsError: $("settings-error"), signOut: $("sign-out"),
    newChat: $("new-chat"), openSettings: $("open-settings"), who: $("who"), conversationLabel: $("conversation-label"),
  };

  const state = {
    token: localStorage.getItem(KEY.token) || "",
    user: localStorage.getItem(KEY.user) || "",
    conversation: localStorage.getItem(KEY.conversation) || "",
    ws: null,
    ready: false,
    attempt: 0,
    retryTimer: null,
    countdownTimer: null,
    queue: [],           // frames sent while disconnected, flushed on the next ready
    history: [],         // [{role, text, status, id, meta}] mirrored in localStorage
    current: null,       // the reply streaming now: {id, entry, node, sent}
    frame: 0,            // the animation frame that will show the streaming reply's new text
    restoring: null,     // after a load: the stored reply that was in flight, to look up and resume
    savedAt: 0,          // when the history was last stored while a reply streamed
  };
  const SAVE_EVERY_MS = 1000;  // a streaming reply's text and seq are stored this often, and on leaving

  // -- storage -------------------------------------------------------------------------------

  function newId(prefix) {
    const bytes = new Uint8Array(8);
    crypto.getRandomValues(bytes);
    return prefix + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  function ensureConversation() {
    if (!state.conversation) {
      state.conversation = newId("web-");
      localStorage.setItem(KEY.conversation, state.conversation);
    }
  }

  function saveHistory() {
    if (!state.user) return;
    const kept = state.history.slice(-KEPT_MESSAGES);
    try {
      localStorage.setItem(KEY.messages(state.user, state.conversation), JSON.stringify(kept));
    } catch (err) { /* storage full: the conversation still lives on the server */ }
  }

  function loadHistory() {
    state.history = [];
    if (!state.user) return;
    try {
      const stored = JSON.parse(localStorage.getItem(KEY.messages(state.user, state.conversation)) || "[]");
      if (Array.isArray(stored)) state.history = stored;
    } catch (err) { state.history = []; }
    // A reply that was still coming when the page went away may still be running in the room:
    // the last one is looked up on the next ready (agent:list) and resumed; earlier ones are over.
    state.restoring = null;
    for (const entry of state.history) {
      if (entry.status !== "streaming" && entry.status !== "pending") continue;
      if (state.restoring) interrupt(state.restoring);
      if (entry.role === "assistant" && entry.id) state.restoring = entry;
      else interrupt(entry);
    }
  }

  function interrupt(entry) {
    entry.status = "interrupted";
    entry.meta = "Connection lost — the reply was interrupted";
  }

  // -- rendering -----------------------------------------------------------------------------

  function render() {
    ui.messages.querySelectorAll(".msg").forEach((node) => node.remove());
    for (const entry of state.history) {
      const node = messageNode(entry);
      ui.messages.appendChild(node);
      if (entry === state.restoring) {
        state.current = { id: entry.id, entry, node, sent: true };
        setBusy(true);
      }
    }
    ui.empty.hidden = state.history.length > 0;
    ui.who.textContent = state.user ? `Signed in as ${state.user}` : "";
    ui.conversationLabel.textContent = state.conversation ? ` · conversation ${state.conversation.slice(-6)}` : "";
    scrollToEnd(true);
  }

  function messageNode(entry) {
    const node = document.createElement("article");
    node.className = `msg ${entry.role}`;
    const bubble = document.createElement("div");
    bubble.className = "bubble";
    const body = document.createElement("div");
    body.className = entry.role === "assistant" ? "text md" : "text";
    bubble.appendChild(body);
    const meta = document.createElement("div");
    meta.className = "meta";
    bubble.appendChild(meta);
    node.appendChild(bubble);
    node._parts = { body, meta };
    updateNode(node, entry);
    return node;
  }

  function updateNode(node, entry) {
    node.dataset.status = entry.status || "done";
    if (entry.id) node.dataset.id = entry.id;
    if (entry.role === "assistant") AtlasMarkdown.renderInto(node._parts.body, entry.text);
    else node._parts.body.textContent = entry.text;   // never innerHTML: all text is untrusted
    node._parts.meta.textContent = entry.meta || "";
    node._parts.meta.hidden = !entry.meta;
  }

  function addEntry(entry) {
    state.history.push(entry);
    const node = messageNode(entry);
    ui.messages.appendChild(node);
    ui.empty.hidden = true;
    saveHistory();
    scrollToEnd(true);
    return node;
  }

  // A streaming reply is rendered again from its whole text (Markdown can change what came
  // before, e.g. when a closing ``` arrives), at most once per frame however fast deltas come.
  function scheduleUpdate() {
    if (state.frame) return;
    state.frame = requestAnimationFrame(() => {
      state.frame = 0;
      if (!state.current) return;
      const stick = nearBottom();
      updateNode(state.current.node, state.current.entry);
      scrollToEnd(stick);
      // The text and the seq it goes up to are stored together, so a reload resumes exactly.
      if (Date.now() - state.savedAt > SAVE_EVERY_MS) { state.savedAt = Date.now(); saveHistory(); }
    });
  }

  function cancelUpdate() {
    cancelAnimationFrame(state.frame);
    state.frame = 0;
  }

  function nearBottom() {
    const s = ui.scroller;
    return s.scrollHeight - s.scrollTop - s.clientHeight < 120;
  }

  function scrollToEnd(force) {
    if (force || nearBottom()) ui.scroller.scrollTop = ui.scroller.scrollHeight;
  }

  function setStatus(kind, text) {
    ui.status.dataset.state = kind;
    ui.statusText.textContent = text;
  }

  function setBusy(busy) {
    ui.stop.hidden = !busy;
    ui.send.hidden = busy;
  }

  // -- the connection ------------------------------------------------------------------------

  function socketUrl() {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const query = new URLSearchParams({ token: state.token, _pk: newId("") });
    return `${scheme}//${location.host}/parties/main/${encodeURIComponent(state.user)}?${query}`;
  }

  async function learnUser() {
    // Built-in auth says whose a token is; with external auth the user id must be typed in.
    const response = await fetch("/api/me", { headers: { Authorization: `Bearer ${state.token}` } });
    if (response.status === 401) throw new Error("The token was not accepted.");
    if (!response.ok) throw new Error("Please enter your user id.");
    const me = await response.json();
    const id = me && (me.id || (me.data && me.data.id));
    if (!id) throw new Error("Please enter your user id.");
    return String(id);
  }

  async function connect() {
    clearTimeout(state.retryTimer);
    clearInterval(state.countdownTimer);
    if (!state.token) { showSettings(); setStatus("offline", "Signed out"); return; }
    if (!state.user) {
      try {
        state.user = await learnUser();
        localStorage.setItem(KEY.user, state.user);
        loadHistory();
        render();
      } catch (err) {
        showSettings(err.message);
        setStatus("offline", "Signed out");
        return;
      }
    }
    setStatus("connecting", state.attempt ? "Reconnecting…" : "Connecting…");
    let ws;
    try {
      ws = new WebSocket(socketUrl());
    } catch (err) {
      scheduleReconnect();
      return;
    }
    state.ws = ws;
    let refusal = null;
    ws.onmessage = (event) => {
      let frame;
      try { frame = JSON.parse(event.data); } catch (err) { return; }
      if (frame.type === "error" && !state.ready) refusal = frame.error;
      onFrame(frame);
    };
    ws.onclose = (event) => {
      if (state.ws !== ws) return;
      state.ws = null;
      state.ready = false;
      if (FATAL_CLOSES[event.code]) {
        interruptCurrent();
        setStatus("error", "Signed out");
        showSettings((refusal && refusal.message) || FATAL_CLOSES[event.code]);
        return;
      }
      scheduleReconnect();
    };
  }

  function scheduleReconnect() {
    const delay = Math.min(10000, 500 * 1.6 ** state.attempt) * (0.8 + Math.random() * 0.4);
    state.attempt += 1;
    const due = Date.now() + delay;
    const tick = () => {
      const left = Math.max(0, Math.ceil((due - Date.now()) / 1000));
      setStatus("reconnecting", navigator.onLine === false ? "Offline — waiting for the network" : `Reconnecting in ${left}s…`);
    };
    tick();
    state.countdownTimer = setInterval(tick, 250);
    state.retryTimer = setTimeout(connect, delay);
  }

  function reconnectNow() {
    if (state.ws || !state.token) return;
    state.attempt = Math.min(state.attempt, 1);
    connect();
  }

  function send(frame) {
    if (state.ws && state.ready) {
      state.ws.send(JSON.stringify(frame));
      if (state.current && frame.id === state.current.id && frame.type === "agent:stream") state.current.sent = true;
    } else {
      state.queue.push(frame);
    }
  }

  // On ready: the reply in flight when the connection dropped is resumed from the last seq
  // shown; after a load, the room is asked what it still has (the reply is looked up by id).
  function resumeCurrent() {
    const current = state.current;
    if (!current || !current.sent) return;
    if (state.restoring === current.entry) {
      state.ws.send(JSON.stringify({ type: "agent:list" }));
      return;
    }
    state.ws.send(JSON.stringify({ type: "agent:resume", id: current.id, after: current.entry.seq || 0 }));
  }

  function onRequests(requests) {
    const entry = state.restoring;
    state.restoring = null;
    if (!entry || !state.current || state.current.entry !== entry) return;
    const known = (requests || []).some((request) => request.id === entry.id);
    if (!known) {
      interruptCurrent();
      return;
    }
    state.ws.send(JSON.stringify({ type: "agent:resume", id: entry.id, after: entry.seq || 0 }));
  }

  function onFrame(frame) {
    switch (frame.type) {
      case "ready":
        state.ready = true;
        state.attempt = 0;
        clearInterval(state.countdownTimer);
        setStatus("online", "Connected");
        resumeCurrent();
        for (const queued of state.queue.splice(0)) send(queued);
        break;
      case "agent:requests":
        onRequests(frame.requests);
        break;
      case "agent:delta":
        if (state.current && frame.id === state.current.id) {
          const entry = state.current.entry;
          if (typeof frame.seq === "number") {
            if (frame.seq <= (entry.seq || 0)) break;  // already shown
            entry.seq = frame.seq;
          }
          entry.text += frame.text || "";
          entry.status = "streaming";
          entry.meta = "";
          scheduleUpdate();
        }
        break;
      case "agent:done":
        if (state.current && frame.id === state.current.id) {
          const entry = state.current.entry;
          if (typeof frame.text === "string") entry.text = frame.text;
          entry.status = "done";
          const usage = frame.usage || {};
          entry.meta = usage.totalTokens != null ? `${usage.totalTokens} tokens` : "";
          finishCurrent();
        }
        break;
      case "agent:error":
        if (state.current && frame.id === state.current.id) {
          const error = frame.error || {};
          const entry = state.current.entry;
          if (error.code === "cancelled") {
            entry.status = "cancelled";
            entry.meta = "Stopped";
          } else if (error.code === "unknown_request") {
            interrupt(entry);  // the room no longer has it (expired, or its server went away)
          } else {
            entry.status = "error";
            entry.meta = describeError(error);
          }
          finishCurrent();
        }
        break;
      case "error":
        if (state.ready) toast(frame.error);
        break;
      default:
        break;
    }
  }

  function finishCurrent() {
    const current = state.current;
    state.current = null;
    cancelUpdate();
    const stick = nearBottom();
    updateNode(current.node, current.entry);
    saveHistory();
    setBusy(false);
    scrollToEnd(stick);
  }

  function interruptCurrent() {
    // A reply that cannot be resumed is lost; a queued one is still to be sent.
    if (!state.current || state.queue.some((frame) => frame.id === state.current.id)) return;
    interrupt(state.current.entry);
    finishCurrent();
  }

  // A limit's refusal says what was used and when to come back, in the reader's own time.
  function describeError(error) {
    const message = error.message || "the request failed";
    if (error.code === "quota_exceeded" && error.resetAt) {
      const used = message.split("; the limit resets at")[0];
      const reset = new Date(error.resetAt);
      const when = isNaN(reset) ? error.resetAt : reset.toLocaleString(undefined, {
        weekday: "short", hour: "2-digit", minute: "2-digit",
      });
      return `Limit reached: ${used}. It resets ${when}.`;
    }
    if (error.code === "rate_limited" && error.retryAfter) {
      return `Too many requests right now: try again in ${error.retryAfter} s.`;
    }
    return `${error.code || "error"}: ${message}`;
  }

  function toast(error) {
    const entry = { role: "system", text: `${(error && error.code) || "error"}: ${(error && error.message) || ""}`, status: "error" };
    addEntry(entry);
  }

  // -- the user ------------------------------------------------------------------------------

  function submit() {
    const text = ui.input.value.trim();
    if (!text || state.current) return;
    if (!state.token) { showSettings(); return; }
    ui.input.value = "";
    autoGrow();
    addEntry({ role: "user", text, status: "done" });
    const id = newId("web-");
    const entry = { role: "assistant", text: "", status: "pending", id, seq: 0 };
    const node = addEntry(entry);
    state.current = { id, entry, node, sent: false };
    setBusy(true);
    send({ type: "agent:stream", id, message: text, conversationId: state.conversation, resumable: true });
  }

  function stop() {
    const current = state.current;
    if (!current) return;
    const queued = state.queue.findIndex((frame) => frame.id === current.id);
    if (queued >= 0) {
      state.queue.splice(queued, 1);
      current.entry.status = "cancelled";
      current.entry.meta = "Not sent";
      finishCurrent();
      return;
    }
    ui.stop.disabled = true;
    send({ type: "agent:cancel", id: current.id });
    setTimeout(() => { ui.stop.disabled = false; }, 300);
  }

  function newConversation() {
    if (state.current) stop();
    state.conversation = "";
    ensureConversation();
    state.history = [];
    saveHistory();
    render();
    ui.input.focus();
  }

  function autoGrow() {
    ui.input.style.height = "auto";
    ui.input.style.height = `${Math.min(ui.input.scrollHeight, 200)}px`;
  }

  function showSettings(error) {
    ui.userField.value = state.user;
    ui.tokenField.value = state.token;
    ui.settingsError.textContent = error || "";
    ui.settingsError.hidden = !error;
    if (!ui.settings.open) ui.settings.showModal();
  }

  function signIn(user, token) {
    const changed = user !== state.user || token !== state.token;
    state.user = user;
    state.token = token;
    localStorage.setItem(KEY.user, user);
    localStorage.setItem(KEY.token, token);
    if (!changed && state.ws) return;
    if (state.ws) { const ws = state.ws; state.ws = null; state.ready = false; ws.close(1000); }
    interruptCurrent();
    state.attempt = 0;
    loadHistory();
    render();
    connect();
  }

  function signOut() {
    localStorage.removeItem(KEY.token);
    localStorage.removeItem(KEY.user);
    state.token = "";
    state.user = "";
    if (state.ws) { const ws = state.ws; state.ws = null; ws.close(1000); }
    clearTimeout(state.retryTimer);
    clearInterval(state.countdownTimer);
    state.history = [];
    render();
    setStatus("offline", "Signed out");
    showSettings();
  }

  // A first-run link may carry the credentials in the fragment (never sent to the server):
  // #token=...&user=... . They are stored and removed from the address bar at once.
  function readFragment() {
    if (!location.hash.includes("token=")) return;
    const params = new URLSearchParams(location.hash.slice(1));
    if (params.get("token")) {
      state.token = params.get("token");
      localStorage.setItem(KEY.token, state.token);
      state.user = params.get("user") || "";
      localStorage.setItem(KEY.user, state.user);
    }
    history.replaceState(null, "", location.pathname + location.search);
  }

  ui.composer.addEventListener("submit", (event) => { event.preventDefault(); submit(); });
  ui.input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) { event.preventDefault(); submit(); }
  });
  ui.input.addEventListener("input", autoGrow);
  ui.stop.addEventListener("click", stop);
  ui.newChat.addEventListener("click", newConversation);
  ui.openSettings.addEventListener("click", () => showSettings());
  ui.signOut.addEventListener("click", () => { ui.settings.close(); signOut(); });
  ui.settingsForm.addEventListener("submit", (event) => {
    const token = ui.tokenField.value.trim();
    if (!token) { event.preventDefault(); return; }
    signIn(ui.userField.value.trim(), token);
  });
  window.addEventListener("online", reconnectNow);
  window.addEventListener("pagehide", saveHistory);  // a reload resumes from what was shown
  document.addEventListener("visibilitychange", () => { if (!document.hidden) reconnectNow(); });

  readFragment();
  ensureConversation();
  loadHistory();
  render();
  connect();
  if (state.token) ui.input.focus();
})();
