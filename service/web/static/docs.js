// Swagger UI for segserve, offline: the assets come from the server itself. With an API key
// set, the key the web page (/) was given is sent with every request, the spec's included;
// without one yet, a 401 on the spec asks for it.
const KEY = "segserve-api-key";

function withKey(request) {
  const key = sessionStorage.getItem(KEY);
  if (key) request.headers.Authorization = "Bearer " + key;
  return request;
}

function askOn401(response) {
  if (response.status === 401 && response.url.endsWith("/openapi.json")) {
    const key = window.prompt("This server needs its API key to show its API:");
    if (key) {
      sessionStorage.setItem(KEY, key);
      window.location.reload();
    }
  }
  return response;
}

window.ui = SwaggerUIBundle({
  url: "/openapi.json",
  dom_id: "#swagger-ui",
  deepLinking: true,
  persistAuthorization: true,
  requestInterceptor: withKey,
  responseInterceptor: askOn401,
  presets: [SwaggerUIBundle.presets.apis],
  layout: "BaseLayout",
});
