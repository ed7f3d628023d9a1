// Load UI workflows into the real ComfyUI frontend (headless Chromium), one after the other in one page
// (the frontend and the pack's extension boot once), and write what each shows: a screenshot, the API
// graph the frontend itself produces (app.graphToPrompt) and the console's errors and warnings: those
// of the boot (the pack's extension loading) and those logged while that workflow was loaded.
// Driven by frontend_check.py (and so by tests/test_frontend.py).
// Usage: node frontend_check.js URL JOBS.json, JOBS = [{workflow, png, json, command?}, ...]; with a
// command, the page's text before and after running it is written too.
const { chromium } = require('playwright-core');
const fs = require('fs');
(async () => {
  const [url, jobsPath] = process.argv.slice(2);
  const browser = await chromium.launch({executablePath: process.env.ADS_CHROMIUM || '/usr/bin/chromium',
    args: ['--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update',
           '--disable-sync', '--no-first-run', '--disable-quic']});
  try {
    await showAll(browser, url, JSON.parse(fs.readFileSync(jobsPath)));
  } finally {
    await browser.close();
  }
})().catch(e => { console.error(e); process.exit(1); });

const reported = l => l.type === 'error' || l.type === 'pageerror' || l.type === 'warning';

async function showAll(browser, url, jobs) {
  const page = await browser.newPage({viewport: {width: 1900, height: 1000}});
  let logs = [];
  page.on('console', m => logs.push({type: m.type(), text: m.text()}));
  page.on('pageerror', e => logs.push({type: 'pageerror', text: String(e && e.stack || e)}));
  await page.goto(url);
  await page.waitForFunction(() => window.app && window.app.graph && window.app.graph.nodes, null, {timeout: 90000});
  await page.waitForTimeout(3000);
  // a first boot opens the template browser over the canvas: close it, or every screenshot shows it
  await page.keyboard.press('Escape');
  await page.waitForTimeout(500);
  const boot = logs.filter(reported);
  for (const job of jobs) {
    logs = [];
    const wf = JSON.parse(fs.readFileSync(job.workflow));
    await page.evaluate(async (wf) => { await window.app.loadGraphData(wf); }, wf);
    await page.waitForTimeout(2500);
    let before = null;
    if (job.command) {  // a command of the pack's extension, run on the loaded workflow
      before = await page.evaluate(() => document.body.innerText);
      await page.keyboard.press('Escape');  // the missing-nodes dialog of a workflow with foreign nodes
      await page.waitForTimeout(300);
      await page.evaluate(async (c) => { await window.app.extensionManager.command.execute(c); }, job.command);
      await page.waitForTimeout(2500);
    }
    const preview = job.preview ? await page.evaluate(checkPreview, job.preview) : null;
    const prompt = await page.evaluate(async () => (await window.app.graphToPrompt()).output);
    const missing = await page.evaluate(() => window.app.graph.nodes.filter(n => n.has_errors || n.type === undefined)
      .map(n => n.type));
    const run = job.run ? await queueAnimated(page, job.run, job.png) : null;
    if (!run) await page.screenshot({path: job.png});
    const after = job.command ? await page.evaluate(() => document.body.innerText) : null;
    fs.writeFileSync(job.json, JSON.stringify({prompt, missing, console: [...boot, ...logs.filter(reported)],
                                               before, after, preview, run}));
  }
  await page.close();
}

// In the page: the schedule preview of the first Context Options node, before and after changing its
// settings and the latent's frame count; the pixels against a reference rendering of the expected
// windows (renderSchedule of the pack's extension fed the Python core's windows); then an invalid overlap.
async function checkPreview(p) {
  const app = window.app;
  const node = app.graph.nodes.find((n) => n.type === 'ADS_ContextOptions');
  const latent = app.graph.nodes.find((n) => n.type === 'EmptyLatentImage');
  const redraw = async () => {
    app.graph.setDirtyCanvas(true, true);
    app.canvas.draw(true, true);
    await new Promise((r) => setTimeout(r, 400));
  };
  const set = (n, name, value) => {
    const widget = n.widgets.find((w) => w.name === name);
    widget.value = value;
    widget.callback?.(value);
  };
  const pixels = (c) => Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height - 16).data);
  const value = (n, name) => n.widgets.find((w) => w.name === name).value;
  const restore = [[latent, 'batch_size', value(latent, 'batch_size')],
                   ...Object.keys(p.set).map((name) => [node, name, value(node, name)])];
  await redraw();
  const canvas = node.adsPreview.canvas;
  const before = pixels(canvas);
  for (const [name, value] of Object.entries(p.set)) set(node, name, value);
  set(latent, 'batch_size', p.expected.frames);
  await redraw();
  const after = pixels(canvas);
  const extensions = await (await fetch('/extensions')).json();
  const module = await import(extensions.find((path) => path.endsWith('/context_preview.js')));
  const reference = document.createElement('canvas');
  reference.width = canvas.width;
  reference.height = canvas.height;
  module.renderSchedule(reference, p.expected, '');
  const expected = pixels(reference);
  const shown = {clip: node.adsPreview.clip, windows: node.adsPreview.model.steps};
  set(node, 'context_overlap', p.set.context_length);
  await redraw();
  const invalid = node.adsPreview.model.problems;
  const flagged = pixels(canvas);
  let red = 0;
  for (let i = 0; i < flagged.length; i += 4) red += flagged[i] > 200 && flagged[i + 1] < 120 ? 1 : 0;
  for (const [n, name, v] of restore) set(n, name, v);  // the graph as loaded, for graphToPrompt
  await redraw();
  return {changed: before.some((v, i) => v !== after[i]), equal: expected.every((v, i) => v === after[i]),
          invalid, redPixels: red, shown, nonBlank: after.some((v, i) => i % 4 !== 3 && v > 60)};
}

// Queue the loaded workflow with the animated preview at p.fps (set through the pack's setting, which
// posts it to the server), collect the previews the page receives for the sampler, screenshot the
// canvas while it samples, and wait for the prompt to finish.
async function queueAnimated(page, p, png) {
  await page.evaluate(async (p) => {
    const app = window.app;
    const api = app.api ?? (await import('/scripts/api.js')).api;
    await app.extensionManager.setting.set('AnimateDiffSuite.AnimatedPreview.Fps', p.fps);
    await new Promise((r) => setTimeout(r, 500));
    const sampler = app.graph.nodes.find((n) => n.type === 'KSampler');
    const run = window.adsRun = {sampler: String(sampler.id), previews: 0, hashes: [], nodes: [], done: false};
    api.addEventListener('b_preview_with_metadata', async ({detail}) => {
      run.previews += 1;
      if (!run.nodes.includes(detail.displayNodeId)) run.nodes.push(detail.displayNodeId);
      const bytes = new Uint8Array(await detail.blob.arrayBuffer());
      let hash = 0;
      for (const b of bytes) hash = (hash * 31 + b) >>> 0;
      if (!run.hashes.includes(hash)) run.hashes.push(hash);
    });
    for (const kind of ['execution_success', 'execution_error', 'execution_interrupted']) {
      api.addEventListener(kind, ({detail}) => { run.done = run.done || kind; run.detail = detail; });
    }
    await app.queuePrompt(0, 1);
  }, p);
  let shot = false;
  // up to 5 minutes: the run is 16 frames on tiny models (seconds), but a loaded CI machine runs it far slower
  for (const deadline = Date.now() + 300000; Date.now() < deadline;) {
    const run = await page.evaluate(() => window.adsRun);
    if (!shot && run.hashes.length >= 3) {
      await page.waitForTimeout(200);
      await page.screenshot({path: png});
      shot = true;
    }
    if (run.done) break;
    await page.waitForTimeout(100);
  }
  const run = await page.evaluate(() => {
    const widget = (type, name) => window.app.graph.nodes.find((n) => n.type === type)
      ?.widgets?.find((w) => w.name === name)?.value ?? null;
    return {...window.adsRun, badges: {loaded: widget('ADS_LoadMotionModel', 'loaded'),
                                       chosen: widget('ADS_ApplyMotionModel', 'chosen')}};
  });
  if (!shot) await page.screenshot({path: png});
  await page.evaluate(() => window.app.canvas.draw(true, true));
  await page.waitForTimeout(300);
  await page.screenshot({path: png.replace(/\.png$/, '_done.png')});
  return {...run, hashes: run.hashes.length, screenshotWhileSampling: shot};
}
