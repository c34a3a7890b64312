// Drives the console's revocation view in Debian's headless Chromium: revoke one certificate by
// serial with a reason, refuse a whole-CA revocation whose confirmation is mistyped, then revoke a
// whole CA with it typed right; read back what the page shows.
// Usage: node revocation.mjs ADMIN_URL TOKEN SERIAL CA_OF_SERIAL CA_TO_REVOKE_ALL SCREENSHOT
import { chromium } from "playwright-core";

const [, , base, token, serial, ca, wholeCa, screenshot] = process.argv;
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 1800 } });
  const errors = [];
  let typed = "";
  const dialogs = [];
  page.on("pageerror", (e) => errors.push(e.message));
  page.on("dialog", (dialog) => {
    dialogs.push(dialog.message());
    return dialog.type() === "prompt" ? dialog.accept(typed) : dialog.accept();
  });
  await page.goto(`${base}/admin`);
  await page.fill("#token", token);
  await page.click("#sign-in");
  await page.waitForSelector(`#revocation-cas tr[data-ca="${ca}"]`, { timeout: 10000 });
  const responder = await page.textContent(`#revocation-cas tr[data-ca="${ca}"] [data-field="responder"]`);

  await page.fill("#revoke-serial", serial);
  await page.selectOption("#revoke-reason", "keyCompromise");
  await page.click("#revoke-button");
  await page.waitForFunction(() => /revoked at/.test(document.getElementById("revoke-result").textContent), null, { timeout: 10000 });
  const revokedOne = await page.textContent("#revoke-result");
  await page.waitForFunction((ca) =>
    document.querySelector(`#revocation-cas tr[data-ca="${ca}"] [data-field="revoked"]`)?.textContent === "1", ca, { timeout: 10000 });

  typed = "not-the-ca";
  await page.click(`button[data-action="revoke-all"][data-ca="${wholeCa}"]`);
  const mistyped = await page.textContent("#lever-error");
  typed = wholeCa;
  await page.selectOption("#revoke-reason", "cessationOfOperation");
  await page.click(`button[data-action="revoke-all"][data-ca="${wholeCa}"]`);
  await page.waitForFunction((ca) => document.getElementById("revoke-result").textContent.includes(`of ${ca} revoked`), wholeCa, { timeout: 20000 });
  const revokedAll = await page.textContent("#revoke-result");
  // The shard whose CRL lists the revocation: made again (a CRL number above 1, not waiting).
  await page.waitForFunction((ca) => [...document.querySelectorAll(`#crl-shards tr[data-ca="${ca}"]`)]
    .some((r) => Number(r.querySelector('[data-field="crl-number"]').textContent) > 1), ca, { timeout: 10000 });
  await page.waitForTimeout(1200);
  await page.screenshot({ path: screenshot, fullPage: true });
  const counts = await page.$$eval("#revocation-cas tr", (rows) => rows.map((r) =>
    [r.dataset.ca, Number(r.querySelector('[data-field="revoked"]').textContent)]));
  const shards = await page.$$eval("#crl-shards tr", (rows) => rows.map((r) =>
    [...r.querySelectorAll("td")].map((td) => td.textContent)));
  console.log(JSON.stringify({ responder, revokedOne, mistyped, revokedAll, counts, shards, dialogs, errors }));
  if (errors.length) process.exitCode = 1;
} finally {
  await browser.close();
}
