-- Orthanc auto-routing of head CTs to glowtriage.
--
-- When a study has been stable for StableAge seconds, forward its CT series to the "GLOWTRIAGE"
-- modality (orthanc.json, DicomModalities) if the study looks like a head CT: a head keyword in the
-- Body Part Examined, Study Description, Series Description or Protocol Name. Only CT series are
-- sent; glowtriage itself picks the axial soft-tissue series among them.
--
-- Each forwarded series is marked with the user metadata "GlowtriageForwarded" (its instance count
-- at the time), so the study turning stable again (glowtriage's own SR arriving, a late slice) does
-- not send the same series twice; a series that gained instances is sent again, whole, and glowtriage
-- drops the duplicates by SOP Instance UID.
--
-- A failed send is logged (Orthanc log, "glowtriage:") and left unmarked; re-send it with
--   curl -X POST http://orthanc:8042/modalities/GLOWTRIAGE/store -d '<series id>'

local TARGET = 'GLOWTRIAGE'
local MARK = 'GlowtriageForwarded'
-- Keep in step with [assembly] head_patterns in glowtriage's config.toml.
local HEAD_PATTERNS = { 'HEAD', 'BRAIN', 'SKULL', 'CRANI', 'NEURO', 'KOPF', 'SCHAEDEL' }

local function isHead(text)
  if text == nil then
    return false
  end
  local upper = string.upper(text)
  for _, pattern in ipairs(HEAD_PATTERNS) do
    if string.find(upper, pattern, 1, true) then
      return true
    end
  end
  return false
end

local function forwardedCount(seriesId)
  -- List the names first: asking for a missing metadata item logs an error in Orthanc.
  for _, name in ipairs(ParseJson(RestApiGet('/series/' .. seriesId .. '/metadata'))) do
    if name == MARK then
      return tonumber(RestApiGet('/series/' .. seriesId .. '/metadata/' .. MARK))
    end
  end
  return nil
end

-- Synchronous C-STORE of a whole series through Orthanc's REST API (Lua's SendToModality takes
-- instances only); a failure raises a Lua error, caught by the caller.
local function sendSeries(seriesId)
  local request = { Resources = { seriesId }, Synchronous = true }
  return RestApiPost('/modalities/' .. TARGET .. '/store', DumpJson(request, true))
end

function OnStableStudy(studyId, tags, metadata)
  local series = ParseJson(RestApiGet('/studies/' .. studyId .. '/series'))

  local head = isHead(tags['StudyDescription'])
  local ctSeries = {}
  for _, s in ipairs(series) do
    local t = s['MainDicomTags']
    if t['Modality'] == 'CT' then
      table.insert(ctSeries, s)
      head = head or isHead(t['BodyPartExamined']) or isHead(t['SeriesDescription'])
        or isHead(t['ProtocolName'])
    end
  end
  if not head or #ctSeries == 0 then
    print('glowtriage: study ' .. studyId .. ' is not a head CT, not forwarded')
    return
  end
  print('glowtriage: head CT study ' .. studyId .. ' stable, ' .. #ctSeries .. ' CT series')

  for _, s in ipairs(ctSeries) do
    local count = #s['Instances']
    if forwardedCount(s['ID']) ~= count then
      local ok, err = pcall(sendSeries, s['ID'])
      if ok then
        RestApiPut('/series/' .. s['ID'] .. '/metadata/' .. MARK, tostring(count))
        print('glowtriage: forwarded series ' .. s['ID'] .. ' (' .. count .. ' instances) of study '
          .. studyId)
      else
        print('glowtriage: forwarding series ' .. s['ID'] .. ' failed: ' .. tostring(err))
      end
    end
  end
end
