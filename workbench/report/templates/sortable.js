// Sortable tables: click (or Enter on) a header of a table.sortable to sort by that column;
// again to reverse. Cells sort by data-sort when present, else by their text; numbers compare
// as numbers, text naturally ("trial-10" after "trial-9"); empty cells stay last either way.
(function () {
  "use strict";
  function keyOf(cell) {
    var raw = cell ? cell.getAttribute("data-sort") : "";
    if (raw === null) raw = cell.textContent.trim();
    if (raw === "" || raw === "\u2013") return { empty: true };
    var n = Number(raw);
    if (!isNaN(n)) return { num: n };
    return { str: raw.toLowerCase() };
  }
  function compare(a, b) {
    if ("num" in a && "num" in b) return a.num - b.num;
    if ("num" in a) return -1;
    if ("num" in b) return 1;
    return a.str.localeCompare(b.str, undefined, { numeric: true });
  }
  function sortBy(table, th, col) {
    var ascending = th.getAttribute("aria-sort") !== "ascending";
    Array.prototype.forEach.call(th.parentNode.cells, function (h) { h.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
    var body = table.tBodies[0];
    var rows = Array.prototype.map.call(body.rows, function (row, i) {
      return { row: row, key: keyOf(row.cells[col]), i: i };
    });
    rows.sort(function (x, y) {
      var ex = x.key.empty ? 1 : 0, ey = y.key.empty ? 1 : 0;
      if (ex || ey) return (ex - ey) || x.i - y.i;
      return (ascending ? compare(x.key, y.key) : compare(y.key, x.key)) || x.i - y.i;
    });
    rows.forEach(function (r) { body.appendChild(r.row); });
  }
  var tables = document.querySelectorAll("table.sortable");
  Array.prototype.forEach.call(tables, function (table) {
    if (!table.tHead || !table.tBodies.length) return;
    var head = table.tHead.rows[table.tHead.rows.length - 1];
    Array.prototype.forEach.call(head.cells, function (th, col) {
      th.tabIndex = 0;
      th.title = "sort by this column";
      th.addEventListener("click", function () { sortBy(table, th, col); });
      th.addEventListener("keydown", function (e) {
        if (e.key === "Enter" || e.key === " ") { e.preventDefault(); sortBy(table, th, col); }
      });
    });
  });
  document.body.setAttribute("data-sortable-ready", String(tables.length));
})();
