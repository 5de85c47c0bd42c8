// The report's filters: by process, by container, unexpected only, and text. Reads the JSON in
// #report-data and shows or hides the elements marked data-link (edges, timeline bars,
// table rows) and data-node (nodes, lane labels). Builds no markup: text stays text.
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("report-data").textContent);
  var processFilter = document.getElementById("filter-process");
  var containerFilter = document.getElementById("filter-container");
  var unexpectedFilter = document.getElementById("filter-unexpected");
  var textFilter = document.getElementById("filter-text");
  var status = document.getElementById("filter-status");
  var links = document.querySelectorAll("[data-link]");
  var nodes = document.querySelectorAll("[data-node]");

  function matches(element, process, container, unexpectedOnly, query) {
    var p = Number(element.getAttribute("data-p"));
    var d = Number(element.getAttribute("data-d"));
    if (process !== "" && Number(process) !== p) return false;
    if (container !== "" && Number(container) !== data.programs[p].container) return false;
    if (unexpectedOnly && element.getAttribute("data-u") !== "1") return false;
    if (query === "") return true;
    return data.programs[p].search.indexOf(query) >= 0 ||
      data.destinations[d].search.indexOf(query) >= 0;
  }

  function apply() {
    var process = processFilter.value;
    var container = containerFilter.value;
    var unexpectedOnly = unexpectedFilter.checked;
    var query = textFilter.value.trim().toLowerCase();
    var liveP = {}, liveD = {}, rows = 0, shown = 0;
    links.forEach(function (element) {
      var ok = matches(element, process, container, unexpectedOnly, query);
      element.classList.toggle("hidden", !ok);
      if (ok) {
        liveP[element.getAttribute("data-p")] = true;
        liveD[element.getAttribute("data-d")] = true;
      }
      if (element.getAttribute("data-link") === "row") {
        rows += 1;
        if (ok) shown += 1;
      }
    });
    nodes.forEach(function (element) {
      var live = element.getAttribute("data-node") === "p"
        ? liveP[element.getAttribute("data-p")] : liveD[element.getAttribute("data-d")];
      element.classList.toggle("hidden", !live);
    });
    status.textContent = "showing " + shown + " of " + rows + " connection rows";
  }

  processFilter.addEventListener("change", apply);
  containerFilter.addEventListener("change", apply);
  unexpectedFilter.addEventListener("change", apply);
  textFilter.addEventListener("input", apply);
  apply();
})();
