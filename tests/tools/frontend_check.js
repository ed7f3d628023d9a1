// Load one UI workflow into the real ComfyUI frontend (headless Chromium), write its screenshot and the
// API graph the frontend itself produces (app.graphToPrompt). Driven by frontend_check.py.
const { chromium } = require('playwright-core');
const fs = require('fs');
(async () => {
  const [url, wfPath, outPng, outJson] = process.argv.slice(2);
  const browser = await chromium.launch({executablePath: '/usr/bin/chromium', args: ['--no-sandbox', '--disable-gpu',
    '--disable-background-networking', '--disable-component-update', '--disable-sync', '--no-first-run', '--disable-quic']});
  const page = await browser.newPage({viewport: {width: 1900, height: 1000}});
  const logs = [];
  page.on('console', m => logs.push(m.type() + ': ' + m.text()));
  await page.goto(url);
  await page.waitForFunction(() => window.app && window.app.graph && window.app.graph.nodes, null, {timeout: 90000});
  await page.waitForTimeout(3000);
  const wf = JSON.parse(fs.readFileSync(wfPath));
  await page.evaluate(async (wf) => { await window.app.loadGraphData(wf); }, wf);
  await page.waitForTimeout(2500);
  const prompt = await page.evaluate(async () => (await window.app.graphToPrompt()).output);
  fs.writeFileSync(outJson, JSON.stringify(prompt));
  await page.screenshot({path: outPng});
  console.log(JSON.stringify(logs.filter(l => l.startsWith('error') || l.includes('issing'))));
  await browser.close();
})();
