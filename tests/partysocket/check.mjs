// Checks the published `partysocket` client against a running `atlas serve`.
//
//   node check.mjs --url http://127.0.0.1:PORT --user alice --token TOKEN [--restart | --resume]
//
// Prints one JSON object per line on stdout ({"event": ...}) so that a driver (tests/test_partysocket.py)
// can follow along. Steps: connect and receive `ready`; stream one reply to `agent:done`; with
// --restart, wait for the server to go away, send a message while disconnected (partysocket
// queues it), and expect partysocket to reconnect by itself and deliver that message once the
// server is back. With --resume: start a resumable reply, wait for the connection to drop
// mid-reply (the driver kills it), let partysocket reconnect by itself, resume from the last seq
// received, and print the whole reply once. Exit status: 0 passed, 1 failed, 3 partysocket/ws
// could not be installed.

import { spawnSync } from "node:child_process";
import { existsSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const TIMEOUT_MS = 30000;

function emit(event, fields = {}) {
  process.stdout.write(JSON.stringify({ event, ...fields }) + "\n");
}

function fail(message) {
  emit("failed", { message });
  process.stderr.write(`partysocket check failed: ${message}\n`);
  process.exit(1);
}

function parseArgs(argv) {
  const args = { restart: false, resume: false };
  for (let i = 0; i < argv.length; i++) {
    const name = argv[i];
    if (name === "--restart") args.restart = true;
    else if (name === "--resume") args.resume = true;
    else if (["--url", "--user", "--token"].includes(name)) args[name.slice(2)] = argv[++i];
    else fail(`unknown argument ${name}`);
  }
  for (const required of ["url", "user", "token"]) {
    if (!args[required]) fail(`--${required} is required`);
  }
  return args;
}

function ensureInstalled() {
  const missing = ["partysocket", "ws"].filter((name) => !existsSync(join(here, "node_modules", name)));
  if (missing.length === 0) return;
  process.stderr.write(`installing ${missing.join(", ")} with npm ...\n`);
  const result = spawnSync("npm", ["install", "--no-audit", "--no-fund", "--loglevel=error"], {
    cwd: here, stdio: ["ignore", 2, 2], timeout: 180000,  // npm's output to stderr: stdout is for events
  });
  if (result.status !== 0) {
    const why = result.error ? result.error.message : `npm exited with ${result.status}`;
    process.stderr.write(
      `cannot install partysocket and ws (${why}): is the npm registry reachable? ` +
      `Run \`npm install\` in ${here} once it is.\n`,
    );
    emit("not-installed", { message: why });
    process.exit(3);
  }
}

// Frames of interest, awaited in order. Anything else (prefs, pong...) is ignored.
function frameQueue(socket) {
  const frames = [];
  const waiters = [];
  socket.addEventListener("message", (event) => {
    let frame;
    try { frame = JSON.parse(event.data); } catch { fail(`a frame that is not JSON: ${event.data}`); }
    frames.push(frame);
    for (const waiter of waiters.splice(0)) waiter();
  });
  return async function next(predicate) {
    for (;;) {
      const index = frames.findIndex(predicate);
      if (index >= 0) return frames.splice(index, 1)[0];
      await new Promise((resolve) => waiters.push(resolve));
    }
  };
}

async function streamReply(socket, next, message, id) {
  socket.send(JSON.stringify({ type: "agent:stream", id, message }));
  const deltas = [];
  for (;;) {
    const frame = await next((f) => f.id === id);
    if (frame.type === "agent:delta") deltas.push(frame.text);
    else if (frame.type === "agent:done") return { frame, deltas };
    else if (frame.type === "agent:error") fail(`${frame.error.code}: ${frame.error.message}`);
  }
}

// The few lines a client needs to survive a dropped connection (docs/clients.md): remember the
// reply in flight and the last seq shown; on every ready, ask for the rest.
function resumable(socket, onText, onEnd) {
  let inflight = null;  // {id, seq}
  socket.addEventListener("message", (event) => {
    const frame = JSON.parse(event.data);
    if (frame.type === "ready" && inflight) {
      socket.send(JSON.stringify({ type: "agent:resume", id: inflight.id, after: inflight.seq }));
      emit("resumed", { id: inflight.id, after: inflight.seq });
    } else if (frame.type === "agent:delta" && inflight && frame.id === inflight.id && frame.seq > inflight.seq) {
      inflight.seq = frame.seq;
      onText(frame.text, frame.seq);
    } else if ((frame.type === "agent:done" || frame.type === "agent:error") && inflight && frame.id === inflight.id) {
      inflight = null;
      onEnd(frame);
    }
  });
  return (id, message) => {
    inflight = { id, seq: 0 };
    socket.send(JSON.stringify({ type: "agent:stream", id, message, resumable: true }));
  };
}

async function resumeAfterDrop(socket, closed) {
  let text = "";
  let ended;
  const end = new Promise((resolve) => { ended = resolve; });
  let holding = null;
  const held = new Promise((resolve) => { holding = resolve; });
  const ask = resumable(socket, (piece, seq) => {
    text += piece;
    if (seq >= 2 && holding) { emit("holding", { seq, text }); holding(); holding = null; }
  }, ended);
  ask("ps-r", "a reply that survives a drop");
  await held;
  const code = await new Promise((resolve) => closed.push(resolve));  // the driver cuts it
  const frame = await end;
  if (frame.type !== "agent:done") fail(`the resumed reply ended with ${JSON.stringify(frame)}`);
  if (text !== frame.text) fail(`shown ${JSON.stringify(text)} but agent:done says ${JSON.stringify(frame.text)}`);
  emit("reply", { text, seq: frame.seq, closeCode: code });
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  ensureInstalled();
  const { PartySocket } = await import("partysocket");
  const { WebSocket } = await import("ws");

  const socket = new PartySocket({
    host: args.url,            // partysocket strips http:// itself and picks ws:// for 127.0.0.1
    room: args.user,           // default party "main": /parties/main/{room}
    query: { token: args.token },
    WebSocket,                 // Node 20 has no global WebSocket
    minReconnectionDelay: 100,
    maxReconnectionDelay: 1000,
  });
  const next = frameQueue(socket);
  let closes = 0;
  const closed = [];
  socket.addEventListener("close", (event) => {
    closes += 1;
    emit("closed", { code: event.code });
    for (const resolve of closed.splice(0)) resolve(event.code);
  });

  const ready = await next((f) => f.type === "ready" || f.type === "error");
  if (ready.type === "error") fail(`refused: ${ready.error.code}: ${ready.error.message}`);
  if (ready.roomId !== args.user) fail(`ready for room ${ready.roomId}, expected ${args.user}`);
  emit("ready", { connectionId: ready.connectionId, pk: socket.id, url: socket.roomUrl });

  if (args.resume) {
    await resumeAfterDrop(socket, closed);
    socket.close();
    emit("passed", { closes });
    process.exit(0);
  }

  const first = await streamReply(socket, next, "hello from partysocket", "ps-1");
  if (first.deltas.length === 0) fail("agent:done arrived without any agent:delta");
  if (first.deltas.join("") !== first.frame.text) fail("the deltas do not add up to agent:done's text");
  emit("done", { id: "ps-1", deltas: first.deltas.length, text: first.frame.text });

  if (args.restart) {
    emit("waiting-for-restart");
    await new Promise((resolve) => closed.push(resolve));
    // Sent while disconnected: partysocket keeps it and sends it after reconnecting.
    socket.send(JSON.stringify({ type: "agent:stream", id: "ps-2", message: "queued while offline" }));
    emit("queued", { bufferedAmount: socket.bufferedAmount });
    const again = await next((f) => f.type === "ready");
    emit("reconnected", { connectionId: again.connectionId, pk: socket.id });
    const deltas = [];
    for (;;) {
      const frame = await next((f) => f.id === "ps-2");
      if (frame.type === "agent:delta") deltas.push(frame.text);
      else if (frame.type === "agent:error") fail(`${frame.error.code}: ${frame.error.message}`);
      else if (frame.type === "agent:done") {
        emit("done", { id: "ps-2", deltas: deltas.length, text: frame.text });
        break;
      }
    }
  }
  socket.close();
  emit("passed", { closes });
  process.exit(0);
}

setTimeout(() => fail(`not finished after ${TIMEOUT_MS / 1000}s`), TIMEOUT_MS).unref();
main().catch((err) => fail(err && err.stack ? err.stack : String(err)));
