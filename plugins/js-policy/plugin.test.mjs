// The plugin's own tests, natively with Node's test runner (node --test): the hooks are plain
// functions, given a session and a message made here.
import { test } from "node:test";
import assert from "node:assert/strict";
import { hooks } from "./plugin.js";

const envelope = { sender: "s@sender.example", recipients: [] };

test("a listed recipient is refused, others continue", () => {
  assert.deepEqual(hooks.init(JSON.stringify({ blocked_recipients: ["Gone@Example.com"] })), {
    hooks: ["rcpt-to", "data"],
  });
  const refused = hooks.rcptTo({}, envelope, "gone@example.com", []);
  assert.equal(refused.verdict.tag, "reject");
  assert.equal(refused.verdict.val.code, 550);
  assert.equal(hooks.rcptTo({}, envelope, "friend@example.com", []).verdict.tag, "continue");
});

test("the data hook tags the message with its subject", () => {
  hooks.init(JSON.stringify({ tag: "seen" }));
  const body = { headers: () => [{ name: "Subject", value: "hello" }] };
  const decision = hooks.data({}, envelope, {}, body);
  assert.deepEqual(decision.edits, [
    { tag: "add-header", val: { name: "X-JS-Policy", value: 'seen; subject "hello"' } },
  ]);
});

test("a config that is not JSON is refused", () => {
  assert.throws(() => hooks.init("{"), /not JSON/);
});
