// The editor's schedule maths (web/js/context_schedule.js) against vectors exported by the Python core
// (tests/test_web_schedule.py writes them and runs this file with node's built-in test runner):
//     node tests/web/context_schedule.test.mjs VECTORS.json
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";

const here = new URL(".", import.meta.url);
const source = readFileSync(new URL("../../web/js/context_schedule.js", here), "utf8");
const schedule = await import("data:text/javascript," + encodeURIComponent(source));
const cases = JSON.parse(readFileSync(process.argv[2], "utf8"));

test("ordered halving", () => {
    assert.deepEqual([0, 1, 2, 3, 4, 5, 6, 7].map(schedule.orderedHalving),
        [0, 0.5, 0.25, 0.75, 0.125, 0.625, 0.375, 0.875]);
});

test(`${cases.length} schedules and fuse weights equal the Python core's`, () => {
    for (const c of cases) {
        const label = JSON.stringify({ frames: c.frames, step: c.step, ...c.options });
        const windows = schedule.contextWindows(c.frames, c.options, c.step);
        assert.deepEqual(windows, c.windows, label);
        windows.forEach((w, k) => {
            const weights = schedule.fuseWeights(w, c.frames, c.options);
            assert.equal(weights.length, c.weights[k].length, label);
            weights.forEach((v, i) => assert.ok(Math.abs(v - c.weights[k][i]) <= 1e-12, `${label} window ${k}`));
        });
    }
});

test("invalid settings are named", () => {
    const base = { context_length: 16, context_overlap: 4, context_stride: 1, closed_loop: false,
                   schedule: "standard_static", fuse_method: "pyramid" };
    assert.deepEqual(schedule.validate(base, 32), []);
    assert.match(schedule.validate({ ...base, context_overlap: 16 })[0], /context_overlap must be less/);
    assert.match(schedule.validate({ ...base, context_length: 32 }, 24)[0], /24-frame limit/);
    assert.deepEqual(schedule.validate({ ...base, context_length: 32, stretch_pe: true }, 24), []);
});
