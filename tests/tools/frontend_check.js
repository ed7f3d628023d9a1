// Load UI workflows into the real ComfyUI frontend (headless Chromium), one fresh page each, and write
// what each shows: a screenshot, the API graph the frontend itself produces (app.graphToPrompt) and the
// console's errors and warnings. Driven by frontend_check.py (and so by tests/test_frontend.py).
// Usage: node frontend_check.js URL JOBS.json, JOBS = [{workflow, png, json}, ...]
const { chromium } = require('playwright-core');
const fs = require('fs');
(async () => {
  const [url, jobsPath] = process.argv.slice(2);
  const browser = await chromium.launch({executablePath: process.env.ADS_CHROMIUM || '/usr/bin/chromium',
    args: ['--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update',
           '--disable-sync', '--no-first-run', '--disable-quic']});
  try {
    for (const job of JSON.parse(fs.readFileSync(jobsPath))) await show(browser, url, job.workflow, job.png, job.json);
  } finally {
    await browser.close();
  }
})().catch(e => { console.error(e); process.exit(1); });

async function show(browser, url, wfPath, outPng, outJson) {
  const page = await browser.newPage({viewport: {width: 1900, height: 1000}});
  const logs = [];
  page.on('console', m => logs.push({type: m.type(), text: m.text()}));
  page.on('pageerror', e => logs.push({type: 'pageerror', text: String(e && e.stack || e)}));
  await page.goto(url);
  await page.waitForFunction(() => window.app && window.app.graph && window.app.graph.nodes, null, {timeout: 90000});
  await page.waitForTimeout(3000);
  const wf = JSON.parse(fs.readFileSync(wfPath));
  await page.evaluate(async (wf) => { await window.app.loadGraphData(wf); }, wf);
  await page.waitForTimeout(2500);
  const prompt = await page.evaluate(async () => (await window.app.graphToPrompt()).output);
  const missing = await page.evaluate(() => window.app.graph.nodes.filter(n => n.has_errors || n.type === undefined)
    .map(n => n.type));
  await page.screenshot({path: outPng});
  fs.writeFileSync(outJson, JSON.stringify({prompt, missing,
    console: logs.filter(l => l.type === 'error' || l.type === 'pageerror' || l.type === 'warning')}));
  await page.close();
}
